"""cpsl_ops::rectify_pseudo_labels: fake kernel (schema and kernels: csrc/ops/rectify.cpp), and the
reference backend's op cpsl_ops_reference::rectify_pseudo_labels."""

from typing import Tuple

import torch
from torch import Tensor

from cpsl_ops import reference
from cpsl_ops.ops.shapes import register_fake


@torch.library.custom_op("cpsl_ops_reference::rectify_pseudo_labels", mutates_args=())
def reference_rectify_pseudo_labels(
    soft_pseudo_labels: Tensor, prototype_logits: Tensor, threshold: float, ignore_index: int
) -> Tuple[Tensor, Tensor]:
    """:func:`cpsl_ops.reference.rectify_pseudo_labels` as one op: torch.compile traces around its
    value checks, which raise when it runs."""
    labels, confidence = reference.rectify_pseudo_labels(soft_pseudo_labels, prototype_logits, threshold, ignore_index)
    return labels.contiguous(), confidence.contiguous()


@register_fake("rectify_pseudo_labels")
def _rectify_fake(
    soft_pseudo_labels: Tensor, prototype_logits: Tensor, threshold: float, ignore_index: int
) -> Tuple[Tensor, Tensor]:
    batch, _, height, width = soft_pseudo_labels.shape
    labels = soft_pseudo_labels.new_empty((batch, height, width), dtype=torch.long)
    return labels, soft_pseudo_labels.new_empty((batch, height, width))
