"""cpsl_ops::update_prototypes: fake kernel (schema and kernels: csrc/ops/prototype_update.cpp)."""

from typing import Tuple

import torch
from torch import Tensor


@torch.library.register_fake("cpsl_ops::update_prototypes")
def _update_prototypes_fake(
    prototypes: Tensor, features: Tensor, labels: Tensor, momentum: float, ignore_index: int
) -> Tuple[Tensor, Tensor]:
    return prototypes.new_empty(prototypes.shape), prototypes.new_empty((prototypes.shape[0],), dtype=torch.long)
