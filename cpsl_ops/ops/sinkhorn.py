"""cpsl_ops::balanced_sinkhorn: fake kernel (schema and kernels: csrc/ops/sinkhorn.cpp), and the
reference backend's op cpsl_ops_reference::balanced_sinkhorn.

No autograd formula: the assignment is a detached target by design.
"""

import torch
from torch import Tensor

from cpsl_ops import reference
from cpsl_ops.ops.shapes import register_fake


@torch.library.custom_op("cpsl_ops_reference::balanced_sinkhorn", mutates_args=())
def reference_balanced_sinkhorn(scores: Tensor, class_prior: Tensor, epsilon: float, num_iters: int) -> Tensor:
    """:func:`cpsl_ops.reference.balanced_sinkhorn` as one op: torch.compile traces around its value
    checks, which raise when it runs."""
    return reference.balanced_sinkhorn(scores, class_prior, epsilon, num_iters).contiguous()


@register_fake("balanced_sinkhorn")
def _balanced_sinkhorn_fake(scores: Tensor, class_prior: Tensor, epsilon: float, num_iters: int) -> Tensor:
    return scores.new_empty(scores.shape)
