"""cpsl_ops::balanced_sinkhorn: fake kernel (schema and kernels: csrc/ops/sinkhorn.cpp).

No autograd formula: the assignment is a detached target by design.
"""

import torch
from torch import Tensor


@torch.library.register_fake("cpsl_ops::balanced_sinkhorn")
def _balanced_sinkhorn_fake(scores: Tensor, class_prior: Tensor, epsilon: float, num_iters: int) -> Tensor:
    return scores.new_empty(scores.shape)
