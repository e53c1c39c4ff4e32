"""cpsl_ops::similarity (both metrics): fake kernels and autograd (schema and kernels: csrc/ops/similarity.cpp)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from cpsl_ops import reference


def logits_shape(features: Tensor, num_classes: int) -> Tuple[int, ...]:
    """(N, K) for flat features, (B, K, H, W) for channel-first features."""
    shape = list(features.shape)
    shape[1] = num_classes
    return tuple(shape)


def _similarity_fake(features: Tensor, prototypes: Tensor, temperature: float, metric: str = "cosine") -> Tensor:
    return features.new_empty(logits_shape(features, prototypes.shape[0]))


def _similarity_backward_fake(
    grad_logits: Tensor, features: Tensor, prototypes: Tensor, temperature: float, metric: str = "cosine"
) -> Tuple[Tensor, Tensor]:
    return features.new_empty(features.shape), prototypes.new_empty(prototypes.shape)


# Registered by a call rather than as decorators: torch.library.register_fake has no return
# annotation, so as a decorator it would make the fake kernels untyped; the call form does the same
# registration (torch.library.register_fake(op, func) is register_fake(op)(func)).
torch.library.register_fake("cpsl_ops::similarity", _similarity_fake)
torch.library.register_fake("cpsl_ops::similarity_backward", _similarity_backward_fake)


def _setup_context(ctx: Any, inputs: Tuple[Tensor, Tensor, float, str], output: Tensor) -> None:
    features, prototypes, temperature, metric = inputs
    ctx.save_for_backward(features, prototypes)
    ctx.temperature, ctx.metric = temperature, metric


def _backward(ctx: Any, grad_logits: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], None, None]:
    features, prototypes = ctx.saved_tensors
    grad_features, grad_prototypes = torch.ops.cpsl_ops.similarity_backward(
        grad_logits, features, prototypes, ctx.temperature, ctx.metric
    )
    # One entry per argument passed: metric is not there when it was left at its default.
    needs_features, needs_prototypes = ctx.needs_input_grad[:2]
    return (grad_features if needs_features else None, grad_prototypes if needs_prototypes else None, None, None)


torch.library.register_autograd("cpsl_ops::similarity", _backward, setup_context=_setup_context)


def _similarity_backward_setup_context(
    ctx: Any, inputs: Tuple[Tensor, Tensor, Tensor, float, str], output: Tuple[Tensor, Tensor]
) -> None:
    grad_logits, features, prototypes, temperature, metric = inputs
    ctx.save_for_backward(grad_logits, features, prototypes)
    ctx.temperature, ctx.metric = temperature, metric


def _double_backward(
    ctx: Any, grad_grad_features: Optional[Tensor], grad_grad_prototypes: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor, None, None]:
    """Second derivatives, from the reference's formulas (a vector-Jacobian product of its first
    backward): rare enough that a kernel of their own would not pay for itself. The euclidean
    distance has no second derivative at distance 0: there they are NaN, as the reference's."""
    grad_logits, features, prototypes = ctx.saved_tensors

    # torch.func.vjp's annotation is a union of its has_aux=False and has_aux=True results, so
    # the pullback (element 1 of both) is taken by index rather than by unpacking.
    def first_backward(grad: Tensor, f: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
        pullback = torch.func.vjp(lambda f, c: reference.similarity(f, c, ctx.temperature, ctx.metric), f, c)[1]
        gradients: Tuple[Tensor, Tensor] = pullback(grad)
        return gradients

    pullback = torch.func.vjp(first_backward, grad_logits, features, prototypes)[1]
    cotangents = (torch.zeros_like(features) if grad_grad_features is None else grad_grad_features,
                  torch.zeros_like(prototypes) if grad_grad_prototypes is None else grad_grad_prototypes)
    return (*pullback(cotangents), None, None)


torch.library.register_autograd(
    "cpsl_ops::similarity_backward", _double_backward, setup_context=_similarity_backward_setup_context
)
