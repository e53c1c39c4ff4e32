"""cpsl_ops::update_prototypes: fake kernel (schema and kernels: csrc/ops/prototype_update.cpp), and
the reference backend's op cpsl_ops_reference::update_prototypes.

Both are functional (they return the new prototypes); :func:`cpsl_ops.update_prototypes_` copies
them into place.
"""

from typing import Tuple

import torch
from torch import Tensor

from cpsl_ops import reference
from cpsl_ops.ops.shapes import register_fake


@torch.library.custom_op("cpsl_ops_reference::update_prototypes", mutates_args=())
def reference_update_prototypes(
    prototypes: Tensor, features: Tensor, labels: Tensor, momentum: float, ignore_index: int
) -> Tuple[Tensor, Tensor]:
    """:func:`cpsl_ops.reference.update_prototypes` as one op: torch.compile traces around its value
    checks, which raise when it runs."""
    updated, counts = reference.update_prototypes(prototypes, features, labels, momentum, ignore_index)
    return updated.contiguous(), counts


@register_fake("update_prototypes")
def _update_prototypes_fake(
    prototypes: Tensor, features: Tensor, labels: Tensor, momentum: float, ignore_index: int
) -> Tuple[Tensor, Tensor]:
    return prototypes.new_empty(prototypes.shape), prototypes.new_empty((prototypes.shape[0],), dtype=torch.long)
