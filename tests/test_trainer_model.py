"""The example trainer's DeepLabV2 model (examples/cpsl_trainer/model.py)."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cpsl_trainer.model import DeepLabV2, load_weights  # noqa: E402
from cpsl_trainer.optim import group_table, parameter_groups  # noqa: E402


def _os8(n: int) -> int:
    """Map size at output stride 8: stride-2 conv, ceil-mode stride-2 maxpool, stride-2 layer2."""
    n = (n - 1) // 2 + 1
    n = -(-(n - 1) // 2) + 1
    return (n - 1) // 2 + 1


@pytest.fixture(scope="module")
def resnet18_model() -> DeepLabV2:
    torch.manual_seed(0)
    return DeepLabV2("resnet18", num_classes=5, feat_dim=64)


def test_os8_size_matches_deeplabv2():
    assert (_os8(512), _os8(896), _os8(1024), _os8(2048)) == (65, 113, 129, 257)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_output_shapes(backbone):
    model = DeepLabV2(backbone, num_classes=7, feat_dim=64).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 128))
    assert set(out) == {"feat", "out"}
    assert out["feat"].shape == (2, 64, _os8(64), _os8(128)) == (2, 64, 9, 17)
    assert out["out"].shape == (2, 7, 9, 17)


def test_resnet101_shapes():
    model = DeepLabV2().eval()
    assert sum(p.numel() for p in model.head.parameters()) > 20e6  # CPSL's head is about 22.6M
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 41))
    assert out["feat"].shape == (1, 256, _os8(33), _os8(41))
    assert out["out"].shape == (1, 19, _os8(33), _os8(41))


def test_dilated_basic_block_backbone(resnet18_model):
    b = resnet18_model.backbone
    x = b.maxpool(b.relu(b.bn1(b.conv1(torch.randn(1, 3, 64, 128)))))
    sizes = []
    for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
        x = layer(x)
        sizes.append(tuple(x.shape[2:]))
    assert sizes == [(17, 33), (9, 17), (9, 17), (9, 17)]
    for layer, dilation in ((b.layer3, 2), (b.layer4, 4)):
        assert layer[0].conv1.stride == (1, 1) and layer[0].downsample[0].stride == (1, 1)
        for block in layer:
            for conv in (block.conv1, block.conv2):
                assert conv.dilation == conv.padding == (dilation, dilation)
    assert b.layer2[0].conv1.stride == (2, 2) and b.layer2[0].conv1.dilation == (1, 1)
    assert not hasattr(b, "fc") and not hasattr(b, "avgpool")


def test_head_structure(resnet18_model):
    head = resnet18_model.head
    assert head.classifier.bias is None and head.classifier.kernel_size == (1, 1)
    assert [branch[0].dilation[0] for branch in head.branches] == [1, 6, 12, 18, 24]
    se = head.bottleneck[0].gate
    assert [type(m).__name__ for m in se] == ["AdaptiveAvgPool2d", "Flatten", "Linear", "ReLU", "Linear", "Sigmoid"]
    assert (se[2].in_features, se[2].out_features) == (320, 20)  # 5 branches x 64, reduced 16-fold
    # feat is the GroupNorm output itself (signed, no ReLU), then Dropout2d.
    assert isinstance(head.bottleneck[-1], torch.nn.GroupNorm) and head.bottleneck[-1].num_groups == 32
    assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.1


def test_backward_reaches_backbone_and_head(resnet18_model):
    resnet18_model.train().zero_grad()
    out = resnet18_model(torch.randn(2, 3, 64, 128))
    (out["out"].square().mean() + out["feat"].square().mean()).backward()
    for name in ("backbone.conv1.weight", "backbone.layer4.1.conv2.weight", "head.branches.0.0.weight",
                 "head.bottleneck.0.gate.2.weight", "head.classifier.weight"):
        grad = resnet18_model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_load_torchvision_checkpoint(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18().state_dict()
    # Old torchvision checkpoints (resnet101-5d3b4d8f) have no BN counters.
    reference = {k: v for k, v in reference.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference, path)
    model = DeepLabV2("resnet18", feat_dim=64, pretrained=path)
    loaded = model.backbone.state_dict()
    for key, value in reference.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key


def test_state_dict_round_trip(tmp_path, resnet18_model):
    path = tmp_path / "deeplab.pth"
    torch.save(resnet18_model.state_dict(), path)
    torch.manual_seed(2)
    copy = DeepLabV2("resnet18", num_classes=5, feat_dim=64, pretrained=path)
    for (key, value), (copy_key, copy_value) in zip(resnet18_model.state_dict().items(), copy.state_dict().items()):
        assert key == copy_key and torch.equal(value, copy_value), key


def test_missing_file_message(tmp_path):
    path = tmp_path / "resnet101-63fe2227.pth"
    with pytest.raises(FileNotFoundError) as error:
        DeepLabV2("resnet18", feat_dim=64, pretrained=path)
    assert str(path) in str(error.value)
    assert "https://download.pytorch.org/models/resnet18-" in str(error.value)


def test_bad_keys_raise(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    del state["layer2.0.bn1.weight"]
    state["layer9.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"1 missing keys \['layer2.0.bn1.weight'\].*1 unexpected keys \['layer9.weight'\]"):
        DeepLabV2("resnet18", feat_dim=64, pretrained=tmp_path / "bad.pth")
    # A resnet50 checkpoint does not fit a resnet18 backbone.
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="unexpected keys"):
        DeepLabV2("resnet18", feat_dim=64, pretrained=tmp_path / "r50.pth")
    full = DeepLabV2("resnet18", num_classes=5, feat_dim=64).state_dict()
    del full["head.classifier.weight"]
    torch.save(full, tmp_path / "full.pth")
    with pytest.raises(ValueError, match=r"missing keys \['head.classifier.weight'\]"):
        DeepLabV2("resnet18", num_classes=5, feat_dim=64, pretrained=tmp_path / "full.pth")


def _malformed_weights(model: DeepLabV2):
    state = model.state_dict()
    return {
        "a list": ([torch.zeros(1)], "holds a list, not a state dict"),
        "a tensor": (torch.zeros(3), "holds a Tensor, not a state dict"),
        "a number": ({**state, "backbone.conv1.weight": 3}, r"not a state dict: 1 entries .*backbone.conv1.weight"),
        "another shape": ({**state, "head.classifier.weight": state["head.classifier.weight"][:1]},
                          r"1 of another shape \['head.classifier.weight: \(1, 64, 1, 1\) in the file"),
        "missing keys": ({k: v for k, v in list(state.items())[:5]}, "missing keys"),
    }


@pytest.mark.parametrize("case", ["a list", "a tensor", "a number", "another shape", "missing keys"])
def test_malformed_weights_files_are_errors_naming_the_file(tmp_path, resnet18_model, case):
    payload, message = _malformed_weights(resnet18_model)[case]
    path = tmp_path / "weights.pt"
    torch.save(payload, path)
    build = lambda bn_pretrain: DeepLabV2("resnet18", num_classes=5, feat_dim=64)  # noqa: E731
    for read in (lambda: load_weights(path, build, 5), lambda: build(False).load_pretrained(path)):
        with pytest.raises(ValueError, match=message) as raised:
            read()
        assert str(path) in str(raised.value)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_a_checkpointed_backbone_gives_the_plain_step(backbone):
    # The same gradients and BatchNorm statistics (recomputing a block must not count its batch a
    # second time in the running statistics), dropout in the head included.
    torch.manual_seed(0)
    plain = DeepLabV2(backbone, num_classes=5, feat_dim=64, dilations=(2, 4), layout="official").train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpoint_backbone = True
    images = torch.randn(2, 3, 40, 56)
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        model(images)["out"].square().mean().backward()
    for (name, expected), got in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(expected.grad, got.grad), name
    for (name, expected), got in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        assert torch.equal(expected, got), name


def test_parameter_groups(resnet18_model):
    *backbone, head = parameter_groups(resnet18_model, lr=1e-4, head_lr_mult=5.0)
    assert all((group["lr"], group["lr_mult"]) == (1e-4, 1.0) for group in backbone)
    assert (head["lr"], head["lr_mult"]) == (5e-4, 5.0)
    ids = [id(p) for group in (*backbone, head) for p in group["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in resnet18_model.parameters() if p.requires_grad}
    assert {id(p) for p in head["params"]} == {id(p) for p in resnet18_model.head.parameters()}
    assert parameter_groups(resnet18_model, lr=1.0)[-1]["lr_mult"] == 10.0
    # Named as the run prints them (optim.group_table): the stem once, blocks 3x, downsamples 4x.
    assert [group["name"] for group in (*backbone, head)] == ["backbone x1", "backbone x3", "backbone x4", "head"]
    table = group_table(torch.optim.SGD(parameter_groups(resnet18_model, lr=1.0, official_step=False), lr=1.0))
    assert table.splitlines()[0].split()[:3] == ["backbone", str(len(list(resnet18_model.backbone.parameters()))),
                                                 "tensors"]
