"""cpsl_ops::rectify_pseudo_labels: fake kernel (schema and kernels: csrc/ops/rectify.cpp)."""

from typing import Tuple

import torch
from torch import Tensor


@torch.library.register_fake("cpsl_ops::rectify_pseudo_labels")
def _rectify_fake(
    soft_pseudo_labels: Tensor, prototype_logits: Tensor, threshold: float, ignore_index: int
) -> Tuple[Tensor, Tensor]:
    batch, _, height, width = soft_pseudo_labels.shape
    labels = soft_pseudo_labels.new_empty((batch, height, width), dtype=torch.long)
    return labels, soft_pseudo_labels.new_empty((batch, height, width))
