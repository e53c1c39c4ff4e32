"""Official CPSL checkpoints in and out of the example trainer (examples/cpsl_trainer/official.py,
model.py), checked against an independent implementation of the official network."""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpsl_trainer import official  # noqa: E402
from cpsl_trainer.cli import main  # noqa: E402
from cpsl_trainer.model import DeepLabV2, from_official_checkpoint, load_weights, save_official_checkpoint  # noqa: E402
from cpsl_trainer.optim import make_optimizer, parameter_groups  # noqa: E402
from official_network import OfficialDeepLabV2, randomize  # noqa: E402


def write_official(path, network, iteration=4000, best_iou=np.float64(41.37)):
    prototypes = torch.randn(network.layer5.head[1].weight.shape[0], 256)
    torch.save({"ResNet101": {"model_state": network.state_dict(), "prototypes_ema": prototypes},
                "FCDiscriminator": {"model_state": {"conv1.weight": torch.zeros(1)}},
                "iter": iteration, "best_iou": best_iou}, path)
    return prototypes


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """{(num_classes, bn_pretrain): (official network, its checkpoint file, its EMA prototypes)}:
    a warm-up/stage-1 network and a stage-2/3 one, built once (a ResNet-101 takes seconds)."""
    files = {}
    for num_classes, bn_pretrain in [(19, False), (16, True)]:
        network = randomize(OfficialDeepLabV2(num_classes, bn_pretrain), seed=num_classes)
        path = tmp_path_factory.mktemp("official") / f"{num_classes}.pth"
        files[num_classes, bn_pretrain] = network, path, write_official(path, network)
    return files


@pytest.mark.parametrize("num_classes, bn_pretrain", [(19, False), (16, True)])
def test_official_checkpoints_give_the_official_networks_outputs(official_files, num_classes, bn_pretrain):
    network, path, prototypes = official_files[num_classes, bn_pretrain]
    model = from_official_checkpoint(path, num_classes)
    assert (model.bn_pretrain is not None) == bn_pretrain and not model.training
    image = torch.rand(2, 3, 41, 57)
    with torch.no_grad():
        expected, got = network(image), model(image)
    for key in ("feat", "out"):
        assert got[key].shape == expected[key].shape == (2, got[key].shape[1], 6, 8)
        scale = expected[key].abs().max().item()
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5 * scale)
    checkpoint = official.read_checkpoint(path)
    assert checkpoint.iteration == 4000 and checkpoint.best_iou == pytest.approx(41.37)
    assert torch.equal(checkpoint.prototypes_ema, prototypes)


@pytest.mark.parametrize("scalar_type", official.NUMPY_SCALAR_TYPES)
def test_official_checkpoints_with_any_numpy_scalar_are_read(tmp_path, scalar_type):
    # Only float64 was allowed: an int64 iter or a float32 best_iou was refused as "truncated".
    path = tmp_path / "official.pth"
    torch.save({"ResNet101": {"model_state": {"layer5.weight": torch.zeros(2)}},
                "iter": scalar_type(1), "best_iou": scalar_type(1)}, path)
    checkpoint = official.read_checkpoint(path)
    assert checkpoint.iteration == 1 and checkpoint.best_iou == 1


def test_the_torchvision_layout_is_a_different_network(official_files):
    network, path, _ = official_files[19, False]
    model = from_official_checkpoint(path)
    other = DeepLabV2(layout="torchvision").eval()
    other.load_state_dict(model.state_dict())  # the same names and shapes...
    image = torch.rand(1, 3, 33, 33)
    with torch.no_grad():
        assert not torch.allclose(other(image)["out"], network(image)["out"], rtol=1e-2, atol=1e-3)  # ...not outputs
    layer2, layer3 = model.backbone.layer2[0], model.backbone.layer3[0]
    assert (layer2.conv1.stride, layer2.conv2.stride, layer3.conv2.dilation) == ((2, 2), (1, 1), (2, 2))


def test_export_reads_back_the_same_network(official_files, tmp_path):
    network, path, _ = official_files[16, True]
    model = from_official_checkpoint(path, 16)
    prototypes = torch.randn(16, 256)
    save_official_checkpoint(model, tmp_path / "exported.pth", prototypes, iteration=12, best_iou=55.66)
    exported = official.read_checkpoint(tmp_path / "exported.pth")
    assert exported.model_state.keys() == network.state_dict().keys()
    for name, value in network.state_dict().items():
        assert torch.equal(exported.model_state[name], value), name
    assert (exported.iteration, exported.best_iou) == (12, 55.66) and torch.equal(exported.prototypes_ema, prototypes)
    OfficialDeepLabV2(16, True).load_state_dict(exported.model_state)  # the official network takes it strictly
    with pytest.raises(ValueError, match="official layout"):
        save_official_checkpoint(DeepLabV2(layout="torchvision"), tmp_path / "bad.pth")


def test_the_export_command_writes_what_the_official_network_loads(official_files, tmp_path):
    network, path, _ = official_files[16, True]
    torch.save(from_official_checkpoint(path, 16).state_dict(), tmp_path / "stage2.pt")  # a trainer weights file
    (tmp_path / "run.yaml").write_text("data: {protocol: synthia16}\nmodel: {backbone: resnet101, layout: official}\n")
    assert main(["export", "--config", str(tmp_path / "run.yaml"), "--weights", str(tmp_path / "stage2.pt"),
                 "--output", str(tmp_path / "official.pkl")]) == 0
    exported = official.read_checkpoint(tmp_path / "official.pkl").model_state
    OfficialDeepLabV2(16, True).load_state_dict(exported)
    assert all(torch.equal(exported[name], value) for name, value in network.state_dict().items())
    with pytest.raises(ValueError, match="model.layout=official"):  # an official file meets another network
        main(["export", "--config", str(tmp_path / "run.yaml"), "--weights", str(path), "--output",
              str(tmp_path / "again.pkl"), "model.layout=torchvision"])


def test_bad_official_files_raise_clear_errors(official_files, tmp_path):
    with pytest.raises(ValueError, match="16-class head, not 19"):
        from_official_checkpoint(official_files[16, True][1], 19)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="not an official CPSL checkpoint"):
        official.read_checkpoint(tmp_path / "plain.pth")
    with open(tmp_path / "code.pth", "wb") as file:  # a pickle that would run code is never unpickled
        pickle.dump({"ResNet101": {"model_state": {}}, "hook": print}, file)
    with pytest.raises(ValueError, match="holding only tensors"):
        official.read_checkpoint(tmp_path / "code.pth")
    with pytest.raises(FileNotFoundError):
        official.read_checkpoint(tmp_path / "missing.pth")
    torch.save({"ResNet101": {"model_state": {"conv1.weight": torch.zeros(1)}}}, tmp_path / "headless.pth")
    with pytest.raises(ValueError, match="no classifier"):
        from_official_checkpoint(tmp_path / "headless.pth")
    torch.save({"ResNet101": {"prototypes_ema": torch.zeros(19, 256)}, "iter": 3}, tmp_path / "networkless.pth")
    with pytest.raises(ValueError, match=r"official CPSL checkpoint without a network.*\['model_state'\]"):
        load_weights(tmp_path / "networkless.pth", lambda bn_pretrain: DeepLabV2("resnet18", 19), 19)


def test_load_weights_takes_either_format(official_files, tmp_path):
    def build(bn_pretrain):
        return DeepLabV2("resnet101", 16, bn_pretrain=bn_pretrain)

    from_official = load_weights(official_files[16, True][1], build, 16)
    torch.save(from_official.state_dict(), tmp_path / "trainer.pt")
    from_trainer = load_weights(tmp_path / "trainer.pt", build, 16)
    assert from_trainer.bn_pretrain is not None
    for (name, a), b in zip(from_official.state_dict().items(), from_trainer.state_dict().values()):
        assert torch.equal(a, b), name


def test_simclr_weights_in_a_state_dict_wrapper_load_into_the_backbone(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50()
    torch.save({"state_dict": resnet.state_dict()}, tmp_path / "r50_1x_sk0.pth")
    model = DeepLabV2("resnet50", 19, pretrained=tmp_path / "r50_1x_sk0.pth", bn_pretrain=True)
    assert torch.equal(model.backbone.layer3[5].conv2.weight, resnet.layer3[5].conv2.weight)


def test_bn_pretrain_trains_with_the_head():
    model = DeepLabV2("resnet18", 5, feat_dim=64, bn_pretrain=True)
    *backbone, head = parameter_groups(model, lr=1.0, head_lr_mult=10.0)
    head_ids = {id(p) for p in head["params"]}
    assert head["lr"] == 10.0 and all(id(p) in head_ids for p in model.bn_pretrain.parameters())
    assert not head_ids & {id(p) for group in backbone for p in group["params"]}


def official_optimizer(network, lr, prototypes, head_lr_mult, momentum=0.9, weight_decay=2e-4):
    """The official construction (models/deeplabv2.py optim_parameters, adaptation_modelv2): every
    backbone tensor listed once per module under conv1, bn1, layer1-4 that holds it, on the torch
    SGD loop. Momentum buffers start at zero: torch 1.x, which the official code ran on, created
    one buffer per tensor at its first listing and shared it with the later ones (today's SGD gives
    each listing of the first step a fresh buffer; from a zero buffer both agree)."""
    roots = [network.conv1, network.bn1, network.layer1, network.layer2, network.layer3, network.layer4]
    listed = [p for root in roots for module in root.modules() for p in module.parameters()]
    heads = ([network.bn_pretrain] if hasattr(network, "bn_pretrain") else []) + [network.layer5]
    groups = [{"params": listed, "lr": lr}, {"params": [p for m in heads for p in m.parameters()], "lr": lr * head_lr_mult}]
    groups += [{"params": [prototypes], "lr": lr * 5.0}] if prototypes is not None else []
    with pytest.warns(UserWarning, match="duplicate parameters"):
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=False)
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    return optimizer


@pytest.mark.parametrize("bn_pretrain, head_lr_mult", [(False, 5.0), (True, 10.0)])
def test_the_optimizer_takes_the_official_effective_step(bn_pretrain, head_lr_mult):
    # Stage 1 (5x head, prototypes at 5x) and distillation (10x head, bn_pretrain): three steps of
    # a poly schedule with a fresh gradient each give the same weights to the last bit.
    network = randomize(OfficialDeepLabV2(19, bn_pretrain), seed=1)
    model = DeepLabV2("resnet101", 19, layout="official", bn_pretrain=bn_pretrain)
    model.load_state_dict(official.to_trainer_names(network.state_dict()))
    ours = dict(model.named_parameters())
    pairs = [(param, ours[name]) for name, param in official.to_trainer_names(dict(network.named_parameters())).items()]
    assert len(pairs) == len(ours)
    prototypes = None
    if not bn_pretrain:
        prototypes = torch.nn.Parameter(torch.randn(19, 256))
        pairs.append((prototypes, torch.nn.Parameter(prototypes.detach().clone())))
    expected = official_optimizer(network, 1e-3, prototypes, head_lr_mult)
    for group, mult in zip(expected.param_groups, [1.0, head_lr_mult, 5.0]):
        group["lr_mult"] = mult
    extra = [] if prototypes is None else [{"params": [pairs[-1][1]], "lr_mult": 5.0}]
    optimizer = make_optimizer(model, 1e-3, head_lr_mult, extra)
    generator = torch.Generator().manual_seed(0)
    for factor in (1.0, 0.9, 0.7):
        for group in expected.param_groups + optimizer.param_groups:
            group["lr"] = 1e-3 * group["lr_mult"] * factor
        for theirs, mine in pairs:
            theirs.grad = torch.randn(theirs.shape, generator=generator)
            mine.grad = theirs.grad.clone()
        expected.step()
        optimizer.step()
    for theirs, mine in pairs:
        assert torch.equal(theirs, mine)


def test_each_backbone_tensor_is_updated_as_often_as_the_official_code_lists_it():
    model = DeepLabV2("resnet101", 19, layout="official", bn_pretrain=True)
    updates = {id(p): group["updates"] for group in parameter_groups(model, 1.0) for p in group["params"]}
    for name, count in [("conv1.weight", 1), ("bn1.bias", 1), ("layer1.0.conv1.weight", 3), ("layer3.22.bn3.weight", 3),
                        ("layer1.0.downsample.0.weight", 4), ("layer4.0.downsample.1.bias", 4)]:
        assert updates[id(model.backbone.get_parameter(name))] == count, name
    assert all(updates[id(p)] == 1 for p in [*model.head.parameters(), *model.bn_pretrain.parameters()])
    assert {group["updates"] for group in parameter_groups(model, 1.0, official_step=False)} == {1}

