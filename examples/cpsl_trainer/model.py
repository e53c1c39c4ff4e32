"""CPSL's segmentation network: DeepLabV2 (dilated ResNet, output stride 8) with ProDA's ASPP/SE head.

The backbone is built from torchvision's ResNet, so torchvision's ImageNet checkpoints (and
SimCLRv2 weights converted to its names) load without renaming. Its ``layout`` is either the
official code's (Caffe-style bottlenecks: the stride on the first 1x1 conv, every block of layer3
and layer4 dilated alike) or torchvision's (the stride on the 3x3 conv, the first block of a
dilated stage at the previous dilation); the weights have the same names and shapes in both, but
the networks differ, so official checkpoints need the official layout. The head follows CPSL's
``Classifier_Module2`` (reference notes, section 1): five parallel branches, a squeeze-excitation
gate, a 3x3 bottleneck whose GroupNorm output is the 256-d feature the prototypes cluster, and a
bias-free 1x1 classifier. The official checkpoint format is read and written by
:func:`from_official_checkpoint` and :func:`save_official_checkpoint` (names: ``official.py``).
"""

from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torchvision
from torch import Tensor, nn

from . import official
from .checkpointing import checkpointed
from .config import ModelConfig, RANDOM_WEIGHTS
from .files import load_torch_file

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
LAYOUTS = ("official", "torchvision")
# Where torchvision publishes the ImageNet weights; named in the error when a local file is missing.
_TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}
GROUP_NORM_GROUPS = 32
_SE_REDUCTION = 16  # 1280 -> 80 in CPSL


def _dilate_basic_layer(layer: nn.Sequential, dilation: int) -> None:
    """Turns a stride-2 BasicBlock stage into a stride-1 stage with dilated 3x3 convs.

    torchvision's BasicBlock refuses ``replace_stride_with_dilation``, so resnet18/34 are patched
    after construction. Every block of the stage gets the same dilation, as in DeepLabV2.
    """
    first = layer[0]
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for block in layer:
        for conv in (block.conv1, block.conv2):
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)


def _use_official_layout(resnet: torchvision.models.ResNet) -> None:
    """Moves a bottleneck ResNet (built with layer3/4 dilated) to the official code's layout: the
    stride of layer2's first block on its 1x1 conv, and the first blocks of layer3 and layer4
    dilated like the others (torchvision keeps them at the previous stage's dilation)."""
    first = resnet.layer2[0]
    first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
    for layer, dilation in ((resnet.layer3, 2), (resnet.layer4, 4)):
        layer[0].conv2.dilation = layer[0].conv2.padding = (dilation, dilation)


def _build_backbone(name: str, layout: str) -> torchvision.models.ResNet:
    """A torchvision ResNet at output stride 8, without avgpool/fc, never downloading weights."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    constructor = getattr(torchvision.models, name)
    if name in ("resnet50", "resnet101"):
        resnet = constructor(weights=None, replace_stride_with_dilation=[False, True, True])
        if layout == "official":
            _use_official_layout(resnet)
    else:  # basic blocks: one 3x3 conv takes the stride in both layouts
        resnet = constructor(weights=None)
        _dilate_basic_layer(resnet.layer3, 2)
        _dilate_basic_layer(resnet.layer4, 4)
    # DeepLabV2 pools with ceil_mode, which gives CPSL's map sizes (512x896 -> 65x113, not 64x112);
    # pooling has no parameters, so ImageNet weights are unaffected.
    resnet.maxpool.ceil_mode = True
    del resnet.avgpool, resnet.fc
    return resnet


def _conv_gn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation),
        nn.GroupNorm(GROUP_NORM_GROUPS, out_channels),
        nn.ReLU(inplace=True),
    )


class _SqueezeExcitation(nn.Module):
    """Channel gate: global average pool -> FC -> ReLU -> FC -> sigmoid, multiplied onto the input."""

    def __init__(self, channels: int, reduction: int = _SE_REDUCTION) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)[:, :, None, None]


class ASPPSEHead(nn.Module):
    """CPSL's ``Classifier_Module2``: returns the pre-classifier feature and the logits.

    Each branch is ``feat_dim`` wide (256 in CPSL), so the concatenation has
    ``feat_dim * (len(dilations) + 1)`` channels and the SE gate reduces it 16-fold (1280 -> 80).
    """

    def __init__(
        self, in_channels: int, num_classes: int, feat_dim: int, dilations: Sequence[int], dropout: float = 0.1
    ) -> None:
        super().__init__()
        if feat_dim % GROUP_NORM_GROUPS:
            raise ValueError(f"feat_dim must be a multiple of {GROUP_NORM_GROUPS} for GroupNorm, got {feat_dim}")
        self.branches = nn.ModuleList(
            [_conv_gn_relu(in_channels, feat_dim, 1, 1)] + [_conv_gn_relu(in_channels, feat_dim, 3, d) for d in dilations]
        )
        concat = feat_dim * len(self.branches)
        # No ReLU after the bottleneck's GroupNorm: CPSL clusters this signed feature.
        self.bottleneck = nn.Sequential(
            _SqueezeExcitation(concat),
            nn.Conv2d(concat, feat_dim, 3, padding=1),
            nn.GroupNorm(GROUP_NORM_GROUPS, feat_dim),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(feat_dim, num_classes, 1, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # Small weights keep the randomly initialised head from swamping the pretrained backbone.
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        feat = self.bottleneck(torch.cat([branch(x) for branch in self.branches], dim=1))
        # Dropout sits before "feat" as in CPSL, so the (train-mode) EMA features are dropped out too.
        feat = self.dropout(feat)
        return {"feat": feat, "out": self.classifier(feat)}


def _as_state_dict(payload: object, path: Union[str, Path]) -> Mapping[str, Tensor]:
    """``payload`` if it is a state dict (parameter names to tensors); else a ValueError naming ``path``."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"{path} holds a {type(payload).__name__}, not a state dict (parameter names to tensors)")
    odd = [key for key, value in payload.items() if not (isinstance(key, str) and isinstance(value, Tensor))]
    if odd:
        raise ValueError(f"{path} is not a state dict: {len(odd)} entries are not tensors under parameter names, "
                         f"e.g. {odd[:3]}")
    return payload


def _load_checked(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Loads ``state`` into ``module``; missing or unexpected keys and shape mismatches are a
    ValueError naming ``what`` (the file) and a few of them."""
    # Checkpoints written before torch 0.4.1 (e.g. resnet101-5d3b4d8f) lack these BN counters;
    # BatchNorm fills them in itself.
    expected, given = module.state_dict(), set(state)
    missing = sorted(k for k in set(expected) - given if not k.endswith("num_batches_tracked"))
    unexpected = sorted(given - set(expected))
    mismatched = sorted(k for k in given & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} here" for k in mismatched[:3]]
        raise ValueError(
            f"{what} does not match the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(mismatched)} of another shape {shapes}"
        )
    module.load_state_dict(state, strict=False)  # strict=False only to tolerate missing BN counters


class DeepLabV2(nn.Module):
    """DeepLabV2 with CPSL's head; ``forward`` returns ``{"feat", "out"}`` at output stride 8.

    Args:
        backbone: one of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` (CPSL uses resnet101).
        num_classes: logits channels (19 for Cityscapes, 16 for SYNTHIA).
        feat_dim: width of the head's branches and of ``feat`` (256 in CPSL; multiple of 32).
        dilations: dilations of the four 3x3 ASPP branches.
        pretrained: optional local file: a torchvision ImageNet checkpoint of ``backbone`` (its
            ``fc.*`` keys are ignored), SimCLRv2 weights in torchvision's names (a
            ``{"state_dict": ...}`` file, as the official code reads ``r101_1x_sk0``), or a state
            dict of this class. Nothing is downloaded.
        dropout: channel dropout before ``feat`` (CPSL: 0.1).
        layout: ``"official"`` (the official code's bottlenecks) or ``"torchvision"`` (see the
            module docstring); the same for resnet18/34.
        bn_pretrain: a BatchNorm on the backbone's output, as the official distillation students
            (stages 2 and 3) have; it trains with the head.
        checkpoint_backbone: recompute each backbone block's activations in the backward pass
            instead of keeping them (``checkpointing.py``): less memory, one more backbone
            forward per step, the same results.
    """

    def __init__(
        self,
        backbone: str = "resnet101",
        num_classes: int = 19,
        feat_dim: int = 256,
        dilations: Sequence[int] = (6, 12, 18, 24),
        pretrained: Optional[Union[str, Path]] = None,
        dropout: float = 0.1,
        layout: str = "official",
        bn_pretrain: bool = False,
        checkpoint_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.backbone_name, self.layout, self.checkpoint_backbone = backbone, layout, checkpoint_backbone
        self.backbone = _build_backbone(backbone, layout)
        # torchvision leaves the last stage's output width in ``inplanes`` (512 or 2048).
        in_channels = self.backbone.inplanes
        self.bn_pretrain = nn.BatchNorm2d(in_channels) if bn_pretrain else None
        self.head = ASPPSEHead(in_channels, num_classes, feat_dim, dilations, dropout)
        if pretrained is not None:
            self.load_pretrained(pretrained)

    @classmethod
    def from_config(cls, config: ModelConfig, num_classes: int, pretrained: Optional[Union[str, Path]] = None,
                    bn_pretrain: bool = False) -> "DeepLabV2":
        """The network that a ``config.ModelConfig`` describes, from ``pretrained`` weights (a file,
        or ``"random"``/None for random weights)."""
        weights = None if pretrained == RANDOM_WEIGHTS else pretrained
        return cls(config.backbone, num_classes, config.feat_dim, tuple(config.dilations), weights, config.dropout,
                   config.layout, bn_pretrain, config.checkpoint_backbone)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        if self.checkpoint_backbone and self.training and torch.is_grad_enabled():
            for block in [*b.layer1, *b.layer2, *b.layer3, *b.layer4]:
                x = checkpointed(block, x)
        else:
            x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        if self.bn_pretrain is not None:
            x = self.bn_pretrain(x)
        return self.head(x)

    def load_pretrained(self, path: Union[str, Path]) -> None:
        """Loads a torchvision ImageNet checkpoint into the backbone, or a full DeepLabV2 state dict."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained weights {path} not found; for ImageNet initialisation download "
                f"{_TORCHVISION_URLS[self.backbone_name]} yourself and pass its path"
            )
        state = load_torch_file(path)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):  # SimCLRv2 as officially read
            state = state["state_dict"]
        state = _as_state_dict(state, path)
        if any(k.startswith(("backbone.", "head.")) for k in state):
            _load_checked(self, state, f"DeepLabV2 state dict {path}")
        else:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            _load_checked(self.backbone, state, f"{self.backbone_name} checkpoint {path}")


def from_official_checkpoint(path: Union[str, Path], num_classes: int = 19) -> DeepLabV2:
    """The trainer's DeepLabV2 holding an official CPSL checkpoint's network.

    Reads ``{'ResNet101': {'model_state': ..., ...}, 'iter': ..., 'best_iou': ...}`` without
    unpickling arbitrary objects (:func:`official.read_checkpoint`) and returns a ResNet-101 model in
    the official layout, with ``bn_pretrain`` when the checkpoint has one (stages 2 and 3), in eval
    mode. Its ``forward`` gives the official network's ``{"feat", "out"}``.
    """
    return _official_model(official.read_checkpoint(path), num_classes, path)


def _official_model(checkpoint: official.Checkpoint, num_classes: int, path: Union[str, Path]) -> DeepLabV2:
    found = official.num_classes_of(checkpoint.model_state)
    if found != num_classes:
        raise ValueError(f"{path} has a {found}-class head, not {num_classes}")
    model = DeepLabV2("resnet101", num_classes, layout="official",
                      bn_pretrain=official.has_bn_pretrain(checkpoint.model_state))
    state = _as_state_dict(official.to_trainer_names(checkpoint.model_state), path)
    _load_checked(model, state, f"official checkpoint {path}")
    return model.eval()


def save_official_checkpoint(model: DeepLabV2, path: Union[str, Path], prototypes_ema: Optional[Tensor] = None,
                             iteration: int = 0, best_iou: float = 0.0) -> None:
    """Writes ``model`` (a ResNet-101 in the official layout) in the official checkpoint format."""
    if model.backbone_name != "resnet101" or model.layout != "official":
        raise ValueError(f"the official format holds a ResNet-101 in the official layout, not a "
                         f"{model.backbone_name} in the {model.layout} layout")
    official.write_checkpoint(path, official.to_official_names(model.state_dict()), prototypes_ema, iteration,
                              best_iou)


def load_weights(path: Union[str, Path], build: Callable[[bool], DeepLabV2], num_classes: int,
                 configured: Optional[Tuple[str, str]] = None) -> DeepLabV2:
    """A model with the weights of ``path``: an official checkpoint (its own network), or else a
    state dict of this trainer loaded into ``build(bn_pretrain)``, with ``bn_pretrain`` when the
    state dict has one. With ``configured`` (the run's backbone and layout), an official
    checkpoint, a ResNet-101 in the official layout, is refused for another network."""
    payload = official.load_file(path)  # read once, whatever its format
    checkpoint = official.as_checkpoint(payload, path)
    if checkpoint is not None:
        if configured is not None and tuple(configured) != ("resnet101", "official"):
            raise ValueError(f"{path} is an official ResNet-101 checkpoint: set model.backbone=resnet101 and "
                             f"model.layout=official (got {configured[0]}, {configured[1]})")
        return _official_model(checkpoint, num_classes, path)
    state = _as_state_dict(payload, path)
    model = build(any(name.startswith("bn_pretrain.") for name in state))
    _load_checked(model, state, f"weights file {path}")
    return model
