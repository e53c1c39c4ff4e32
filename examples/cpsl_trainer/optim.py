"""The optimizer of every stage: SGD with the official code's effective backbone step.

The official ``get_1x_lr_params`` walks ``.modules()`` of conv1, bn1 and layer1-4 and yields each
module's (recursive) parameters, so a backbone tensor is listed once per module that encloses it
under those roots: once in the stem, three times in a block (layer, block, conv), four times in a
downsample (layer, block, downsample, conv). The torch it ran on (1.x, a per-parameter loop with
one momentum buffer per tensor) applied an SGD update, weight decay and momentum included, at
every listing: about three times the nominal step. :class:`RepeatedSGD` makes those updates
explicitly, ``updates`` times per tensor and step, instead of relying on a torch that accepts
duplicate parameters (today's warns, and its first step differs: it gives each listing its own
fresh buffer).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .model import DeepLabV2


class RepeatedSGD(torch.optim.Optimizer):
    """SGD (momentum, weight decay, no dampening or Nesterov) that updates the tensors of a
    parameter group ``group["updates"]`` times per step, each update exactly torch's::

        d = grad + weight_decay * p;  buffer = momentum * buffer + d;  p -= lr * buffer

    with one momentum buffer per tensor, starting at zero (the first update's buffer is ``d``, as
    in torch.optim.SGD). Groups without ``updates`` update once: then it is torch's SGD.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "updates": 1})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                for _ in range(group["updates"]):
                    change = param.grad.add(param, alpha=group["weight_decay"])
                    buffer.mul_(group["momentum"]).add_(change)
                    param.add_(buffer, alpha=-group["lr"])
        return loss


def official_listings(roots: Sequence[nn.Module]) -> Counter:
    """How many times the official construction lists each parameter of ``roots``: once per
    module under a root (the root included) that holds it."""
    listings: Counter = Counter()
    for root in roots:
        for module in root.modules():
            listings.update(module.parameters())
    return listings


def parameter_groups(model: DeepLabV2, lr: float, head_lr_mult: float = 10.0,
                     official_step: bool = True) -> List[Dict[str, Any]]:
    """Parameter groups of :class:`RepeatedSGD`: backbone at ``lr``, head (and ``bn_pretrain``)
    at ``lr * head_lr_mult``; with ``official_step`` each backbone tensor is updated as often per
    step as the official construction lists it (one group per count), else once.

    CPSL uses a 10x head in the distillation stages 2/3 and 5x in stage 1 (reference notes,
    section 6), so the stage chooses ``head_lr_mult``. Each group carries ``"lr_mult"`` for a poly
    scheduler (``lr = base_lr * lr_mult * factor``). Weight decay applies to all parameters,
    GroupNorm and biases included, as in CPSL.
    """
    backbone = model.backbone
    roots = [backbone.conv1, backbone.bn1, backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    listings = official_listings(roots) if official_step else Counter(backbone.parameters())
    groups: Dict[int, List[nn.Parameter]] = {}
    for param in backbone.parameters():
        if param.requires_grad:
            groups.setdefault(listings[param], []).append(param)
    heads = [model.head] + ([model.bn_pretrain] if model.bn_pretrain is not None else [])
    head = [p for module in heads for p in module.parameters() if p.requires_grad]
    backbone_groups = [{"name": f"backbone x{updates}" if official_step else "backbone", "params": params, "lr": lr,
                        "lr_mult": 1.0, "updates": updates} for updates, params in sorted(groups.items())]
    head_name = "head" + (" + bn_pretrain" if model.bn_pretrain is not None else "")
    return backbone_groups + [{"name": head_name, "params": head, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult,
                               "updates": 1}]


def group_table(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's parameter groups, one line each: name, tensors, learning-rate multiplier and
    updates per step (what each config key made of the network)."""
    lines = [f"  {group.get('name', f'group {index}'):<22} {len(group['params']):>4} tensors  lr x{group['lr_mult']:g}"
             f"  {group.get('updates', 1)} update{'s' if group.get('updates', 1) > 1 else ''} per step"
             for index, group in enumerate(optimizer.param_groups)]
    return "\n".join(lines)


def make_optimizer(model: DeepLabV2, lr: float, head_lr_mult: float = 10.0, extra_params: Sequence[Dict[str, Any]] = (),
                   momentum: float = 0.9, weight_decay: float = 2e-4, official_step: bool = True) -> RepeatedSGD:
    """The SGD of a stage: :func:`parameter_groups` plus ``extra_params``, groups such as
    ``{"name": "prototypes", "params": [prototypes], "lr_mult": 5.0}`` (stage 1's prototypes;
    updated once per step)."""
    extra = [{"lr": lr * group.get("lr_mult", 1.0), **group} for group in extra_params]
    return RepeatedSGD(parameter_groups(model, lr, head_lr_mult, official_step) + extra, lr=lr, momentum=momentum,
                       weight_decay=weight_decay)
