"""cpsl_ops::class_counts: the class histogram behind :func:`cpsl_ops.class_distribution`.

A Python custom op (it needs no native kernel, so it is registered in every build): its kernel
checks the labels when it runs, so ``torch.compile(..., fullgraph=True)`` traces around it and a
bad label still surfaces as the same ``ValueError`` from compiled code; its fake kernel gives the
shape on meta and fake tensors.
"""

import torch
from torch import Tensor

from cpsl_ops import distributed


@torch.library.custom_op("cpsl_ops::class_counts", mutates_args=())
def class_counts(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(K,) int64 histogram of the labels other than ``ignore_index``; raises ValueError on a label
    outside [0, K) or when every label is ``ignore_index``."""
    return distributed.class_counts(labels, num_classes, ignore_index, None)


@class_counts.register_fake
def _class_counts_fake(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    return labels.new_empty((num_classes,), dtype=torch.long)
