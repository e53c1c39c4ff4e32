"""The official CPSL checkpoint format (lslrh/CPSL, after microsoft/ProDA): reading, writing and
the parameter names of its network.

An official checkpoint is ``{'ResNet101': {'model_state': state_dict, 'prototypes_ema': (K, 256)},
'iter': int, 'best_iou': numpy.float64}`` (warm-up checkpoints also hold the discriminator's
state, ProDA's ``objective_vectors`` instead of ``prototypes_ema``). Its network is the trainer's
DeepLabV2 in the official layout under other names: the backbone's at the top level
(``conv1``, ``layer1``…``layer4``, optional ``bn_pretrain``) and the head as ``layer5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .files import load_torch_file

NETWORK_KEY = "ResNet101"  # the official code keys a network's state by its class name

# (trainer prefix, official prefix) of every parameter and buffer name.
_PREFIXES: List[Tuple[str, str]] = [
    *((f"backbone.{name}.", f"{name}.") for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")),
    ("bn_pretrain.", "bn_pretrain."),
    ("head.branches.", "layer5.conv2d_list."),
    ("head.bottleneck.0.gate.2.", "layer5.bottleneck.0.se.0."),  # the SE gate's two linear layers
    ("head.bottleneck.0.gate.4.", "layer5.bottleneck.0.se.2."),
    ("head.bottleneck.1.", "layer5.bottleneck.1."),
    ("head.bottleneck.2.", "layer5.bottleneck.2."),
    ("head.classifier.", "layer5.head.1."),
]


def _rename(state: Mapping[str, Tensor], to_official: bool) -> Dict[str, Tensor]:
    pairs = _PREFIXES if to_official else [(official, trainer) for trainer, official in _PREFIXES]
    renamed = {}
    for name, value in state.items():
        prefix, replacement = next(((a, b) for a, b in pairs if name.startswith(a)), (None, None))
        if prefix is None:
            raise ValueError(f"parameter {name!r} has no counterpart in the "
                             f"{'official' if to_official else 'trainer'}'s network")
        renamed[replacement + name[len(prefix):]] = value
    return renamed


def to_official_names(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """A trainer DeepLabV2 state dict under the official network's names."""
    return _rename(state, to_official=True)


def to_trainer_names(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """An official network's state dict under the trainer's DeepLabV2 names."""
    return _rename(state, to_official=False)


def num_classes_of(state: Mapping[str, Tensor]) -> int:
    if "layer5.head.1.weight" not in state:
        raise ValueError("the official network's state has no classifier (layer5.head.1.weight)")
    return int(state["layer5.head.1.weight"].shape[0])


def has_bn_pretrain(state: Mapping[str, Tensor]) -> bool:
    return any(name.startswith("bn_pretrain.") for name in state)


@dataclass
class Checkpoint:
    model_state: Dict[str, Tensor]
    prototypes_ema: Optional[Tensor]
    iteration: Optional[int]
    best_iou: Optional[float]


# Every numeric numpy scalar type: official checkpoints hold best_iou as a float64, and a
# re-saved one may hold iter or best_iou as any of these.
NUMPY_SCALAR_TYPES = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                      np.float16, np.float32, np.float64)


def _numpy_scalar_globals() -> list:
    """What unpickling numpy scalars needs, under both numpy module names."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [np.dtype, *(type(np.dtype(scalar_type)) for scalar_type in NUMPY_SCALAR_TYPES)]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((multiarray.scalar, f"{module}.scalar"))
    return allowed


def load_file(path: Union[str, Path]) -> object:
    """A weights file, official or not, unpickling nothing but tensors, containers, numbers and
    numpy scalars (an official checkpoint's ``best_iou``)."""
    with torch.serialization.safe_globals(_numpy_scalar_globals()):
        return load_torch_file(path)


def as_checkpoint(payload: object, path: Union[str, Path]) -> Optional[Checkpoint]:
    """The official checkpoint that the loaded file ``path`` holds, or None when it is in another
    format (e.g. a plain state dict); a ValueError when it is an official one without a network."""
    if not isinstance(payload, Mapping) or NETWORK_KEY not in payload:
        return None
    network = payload[NETWORK_KEY]
    if not isinstance(network, Mapping) or not isinstance(network.get("model_state"), Mapping):
        raise ValueError(f"{path} is an official CPSL checkpoint without a network: it lacks "
                         f"['{NETWORK_KEY}']['model_state']")
    best = payload.get("best_iou")
    iteration = payload.get("iter")
    return Checkpoint(dict(network["model_state"]), network.get("prototypes_ema"),
                      None if iteration is None else int(iteration), None if best is None else float(best))


def read_checkpoint(path: Union[str, Path]) -> Checkpoint:
    """The network state, EMA prototypes, iteration and best mIoU of an official checkpoint."""
    checkpoint = as_checkpoint(load_file(path), path)
    if checkpoint is None:
        raise ValueError(f"{path} is not an official CPSL checkpoint: it lacks ['{NETWORK_KEY}']['model_state']")
    return checkpoint


def write_checkpoint(path: Union[str, Path], model_state: Mapping[str, Tensor], prototypes_ema: Optional[Tensor],
                     iteration: int, best_iou: float) -> None:
    """Writes the official format; ``best_iou`` as a float (the official code reads either)."""
    network: Dict[str, object] = {"model_state": dict(model_state)}
    if prototypes_ema is not None:
        network["prototypes_ema"] = prototypes_ema.detach().cpu()
    torch.save({NETWORK_KEY: network, "iter": int(iteration), "best_iou": float(best_iou)}, path)
