"""CPSL's segmentation network: DeepLabV2 (dilated ResNet, output stride 8) with ProDA's ASPP/SE head.

The backbone is torchvision's ResNet, so torchvision's ImageNet checkpoints load without renaming.
The head follows CPSL's ``Classifier_Module2`` (reference notes, section 1): five parallel branches,
a squeeze-excitation gate, a 3x3 bottleneck whose GroupNorm output is the 256-d feature the
prototypes cluster, and a bias-free 1x1 classifier.
"""

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torchvision
from torch import Tensor, nn

from .files import load_torch_file

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
# Where torchvision publishes the ImageNet weights; named in the error when a local file is missing.
_TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}
_GN_GROUPS = 32
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


def _build_backbone(name: str) -> torchvision.models.ResNet:
    """A torchvision ResNet at output stride 8, without avgpool/fc, never downloading weights."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    constructor = getattr(torchvision.models, name)
    if name in ("resnet50", "resnet101"):
        resnet = constructor(weights=None, replace_stride_with_dilation=[False, True, True])
    else:
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
        nn.GroupNorm(_GN_GROUPS, out_channels),
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
        if feat_dim % _GN_GROUPS:
            raise ValueError(f"feat_dim must be a multiple of {_GN_GROUPS} for GroupNorm, got {feat_dim}")
        self.branches = nn.ModuleList(
            [_conv_gn_relu(in_channels, feat_dim, 1, 1)] + [_conv_gn_relu(in_channels, feat_dim, 3, d) for d in dilations]
        )
        concat = feat_dim * len(self.branches)
        # No ReLU after the bottleneck's GroupNorm: CPSL clusters this signed feature.
        self.bottleneck = nn.Sequential(
            _SqueezeExcitation(concat),
            nn.Conv2d(concat, feat_dim, 3, padding=1),
            nn.GroupNorm(_GN_GROUPS, feat_dim),
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


def _check_keys(expected: Sequence[str], given: Sequence[str], what: str) -> None:
    """Raises a ValueError naming a few missing/unexpected keys of a state dict."""
    # Checkpoints written before torch 0.4.1 (e.g. resnet101-5d3b4d8f) lack these BN counters;
    # BatchNorm fills them in itself.
    missing = sorted(k for k in set(expected) - set(given) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )


class DeepLabV2(nn.Module):
    """DeepLabV2 with CPSL's head; ``forward`` returns ``{"feat", "out"}`` at output stride 8.

    Args:
        backbone: one of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` (CPSL uses resnet101).
        num_classes: logits channels (19 for Cityscapes, 16 for SYNTHIA).
        feat_dim: width of the head's branches and of ``feat`` (256 in CPSL; multiple of 32).
        dilations: dilations of the four 3x3 ASPP branches.
        pretrained: optional local file, either a torchvision ImageNet checkpoint of ``backbone``
            (its ``fc.*`` keys are ignored) or a state dict of this class. Nothing is downloaded.
        dropout: channel dropout before ``feat`` (CPSL: 0.1).
    """

    def __init__(
        self,
        backbone: str = "resnet101",
        num_classes: int = 19,
        feat_dim: int = 256,
        dilations: Sequence[int] = (6, 12, 18, 24),
        pretrained: Optional[Union[str, Path]] = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone = _build_backbone(backbone)
        # torchvision leaves the last stage's output width in ``inplanes`` (512 or 2048).
        in_channels = self.backbone.inplanes
        self.head = ASPPSEHead(in_channels, num_classes, feat_dim, dilations, dropout)
        if pretrained is not None:
            self.load_pretrained(pretrained)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return self.head(x)

    def load_pretrained(self, path: Union[str, Path]) -> None:
        """Loads a torchvision ImageNet checkpoint into the backbone, or a full DeepLabV2 state dict."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained weights {path} not found; for ImageNet initialisation download "
                f"{_TORCHVISION_URLS[self.backbone_name]} yourself and pass its path"
            )
        state: Mapping[str, Any] = load_torch_file(path)
        if any(k.startswith(("backbone.", "head.")) for k in state):
            _check_keys(list(self.state_dict()), list(state), f"DeepLabV2 state dict {path}")
            self.load_state_dict(state, strict=False)  # strict=False only to tolerate missing BN counters
        else:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            _check_keys(list(self.backbone.state_dict()), list(state), f"{self.backbone_name} checkpoint {path}")
            self.backbone.load_state_dict(state, strict=False)


def parameter_groups(model: DeepLabV2, lr: float, head_lr_mult: float = 10.0) -> List[Dict[str, Any]]:
    """SGD parameter groups: backbone at ``lr``, head at ``lr * head_lr_mult``.

    CPSL uses a 10x head in the distillation stages 2/3 and 5x in stage 1 (reference notes,
    section 6), so the stage chooses ``head_lr_mult``. Each group carries ``"lr_mult"`` for a poly
    scheduler (``lr = base_lr * lr_mult * factor``). Weight decay is left to the optimizer and
    applies to all parameters, GroupNorm and biases included, as in CPSL.
    """
    groups = [(model.backbone, 1.0), (model.head, head_lr_mult)]
    return [
        {"params": [p for p in module.parameters() if p.requires_grad], "lr": lr * mult, "lr_mult": mult}
        for module, mult in groups
    ]
