"""cpsl-ops: fused PyTorch operators for class-balanced pixel-level self-labeling (CPSL, CVPR 2022).

Quick start::

    from cpsl_ops import SelfLabelingLoss
    criterion = SelfLabelingLoss(num_classes=19, feat_dim=256, class_prior=prior)
    loss = criterion(ema_features, ema_logits)   # (B, 256, H, W), (B, 19, H, W)

Functional ops (also in :mod:`cpsl_ops.functional`): :func:`prototype_similarity`,
:func:`balanced_sinkhorn`, :func:`update_prototypes_`, :func:`rectify_pseudo_labels`,
:func:`class_distribution`. Backends: :func:`native_available`, :func:`set_backend`,
:func:`use_backend`, :func:`build_info`.
"""

from cpsl_ops import functional as _functional
from cpsl_ops import nn as _nn
from cpsl_ops._loader import build_info, get_backend, native_available, set_backend, use_backend
from cpsl_ops.functional import (
    balanced_sinkhorn,
    class_distribution,
    prototype_similarity,
    rectify_pseudo_labels,
    update_prototypes_,
)
from cpsl_ops.nn import BalancedSinkhorn, PrototypeEMA, PrototypeSimilarity, SelfLabelingLoss

__version__ = "0.1.0"

__all__ = [
    *_functional.__all__,
    *_nn.__all__,
    "native_available",
    "build_info",
    "get_backend",
    "set_backend",
    "use_backend",
]
