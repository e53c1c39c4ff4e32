"""The official CPSL network (lslrh/CPSL models/deeplabv2.py), written from its description for the
tests only: the oracle that checkpoints loaded by the trainer must reproduce. Built from plain
modules under the official parameter names, independently of examples/cpsl_trainer/model.py.

Described behaviour: Caffe-style bottlenecks (stride on the first 1x1 conv, 3x3 conv with
padding = dilation, no conv bias); a downsample on block 0 of every layer; layer3/4 dilated 2/4
at stride 1 in all their blocks; ceil-mode max pooling; an optional BatchNorm(2048) `bn_pretrain`
after layer4; `layer5` concatenates a 1x1 and four dilated 3x3 branches (conv with bias,
GroupNorm(32), ReLU), gates the 1280 channels with an SE block (mean, 1280->80->1280, sigmoid),
then a 3x3 conv to 256 and GroupNorm(32) give 'feat'; 'out' is a bias-free 1x1 conv after
Dropout2d(0.1)."""

from typing import Dict

import torch
from torch import Tensor, nn


class CaffeBottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                        nn.BatchNorm2d(planes * 4)) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class SEBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.se = nn.Sequential(nn.Linear(channels, channels // 16), nn.ReLU(), nn.Linear(channels // 16, channels),
                                nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.se(x.mean(dim=(2, 3)))[:, :, None, None]


class Classifier2(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2048, 256, k, padding=d if k == 3 else 0, dilation=d), nn.GroupNorm(32, 256), nn.ReLU())
            for k, d in [(1, 1), (3, 6), (3, 12), (3, 18), (3, 24)])
        self.bottleneck = nn.Sequential(SEBlock(1280), nn.Conv2d(1280, 256, 3, padding=1), nn.GroupNorm(32, 256))
        self.head = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1, bias=False))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        feat = self.head[0](self.bottleneck(torch.cat([branch(x) for branch in self.conv2d_list], dim=1)))
        return {"feat": feat, "out": self.head[1](feat)}


class OfficialDeepLabV2(nn.Module):
    def __init__(self, num_classes: int, bn_pretrain: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        inplanes = 64
        for index, (planes, blocks, stride, dilation) in enumerate(
                [(64, 3, 1, 1), (128, 4, 2, 1), (256, 23, 1, 2), (512, 3, 1, 4)], start=1):
            layer = []
            for block in range(blocks):
                layer.append(CaffeBottleneck(inplanes, planes, stride if block == 0 else 1, dilation, block == 0))
                inplanes = planes * 4
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        if bn_pretrain:
            self.bn_pretrain = nn.BatchNorm2d(2048)
        self.layer5 = Classifier2(num_classes)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if hasattr(self, "bn_pretrain"):
            x = self.bn_pretrain(x)
        return self.layer5(x)


@torch.no_grad()
def randomize(network: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics that keep activations of order one over 33 blocks."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (1.0 / fan_in) ** 0.5)
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.5 + 0.25)
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return network.eval()
