"""cpsl_ops::similarity: fake kernels and autograd (schema and kernels: csrc/ops/similarity.cpp)."""

from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import Tensor


def logits_shape(features: Tensor, num_classes: int) -> Tuple[int, ...]:
    """(N, K) for flat features, (B, K, H, W) for channel-first features."""
    shape = list(features.shape)
    shape[1] = num_classes
    return tuple(shape)


@torch.library.register_fake("cpsl_ops::similarity")
def _similarity_fake(features: Tensor, prototypes: Tensor, temperature: float) -> Tensor:
    return features.new_empty(logits_shape(features, prototypes.shape[0]))


@torch.library.register_fake("cpsl_ops::similarity_backward")
def _similarity_backward_fake(
    grad_logits: Tensor, features: Tensor, prototypes: Tensor, temperature: float
) -> Tuple[Tensor, Tensor]:
    return features.new_empty(features.shape), prototypes.new_empty(prototypes.shape)


def _setup_context(ctx: Any, inputs: Tuple[Tensor, Tensor, float], output: Tensor) -> None:
    features, prototypes, temperature = inputs
    ctx.save_for_backward(features, prototypes)
    ctx.temperature = temperature


def _backward(ctx: Any, grad_logits: Tensor) -> Tuple[Tensor, Tensor, None]:
    features, prototypes = ctx.saved_tensors
    grad_features, grad_prototypes = torch.ops.cpsl_ops.similarity_backward(
        grad_logits, features, prototypes, ctx.temperature
    )
    needs_features, needs_prototypes, _ = ctx.needs_input_grad
    return (grad_features if needs_features else None, grad_prototypes if needs_prototypes else None, None)


torch.library.register_autograd("cpsl_ops::similarity", _backward, setup_context=_setup_context)


def _double_backward(ctx: Any, grad_features: Tensor, grad_prototypes: Tensor) -> None:
    raise RuntimeError(
        "cpsl_ops: double backward through prototype_similarity is not implemented; use the reference "
        "backend (cpsl_ops.use_backend('reference')) for higher-order gradients"
    )


def _no_context(ctx: Any, inputs: Tuple, output: Tuple[Tensor, Tensor]) -> None:
    pass


# Without this, autograd would treat the backward kernel as constant and return wrong second derivatives.
torch.library.register_autograd("cpsl_ops::similarity_backward", _double_backward, setup_context=_no_context)
