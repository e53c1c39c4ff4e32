"""Pure-PyTorch reference of every ``cpsl_ops::`` op: the readable spec.

Each function has the signature of the op schema of the same name (``csrc/ops/<op>.cpp``) and
returns what the native kernels must return, computed in the accumulation dtype (fp32, or fp64
for fp64 inputs) and cast back. It is also the fallback when the native extension is missing, so
it raises the same ValueErrors on bad values. The public functions run the functions that check
values as custom ops (``cpsl_ops_reference::<op>``, :mod:`cpsl_ops.ops`), so that torch.compile,
``torch.export`` and FakeTensorMode trace around their data-dependent branches.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, fp32 for everything else (as at::opmath_type in the kernels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_values(tensor: Tensor) -> bool:
    """False for meta tensors, which have shapes only: value checks are skipped on them."""
    return not tensor.is_meta


def normalize(x: Tensor) -> Tensor:
    """``F.normalize(x, dim=1)`` (norms clamped at 1e-12), also where |x|^2 overflows (|x| above
    ~1e19 in fp32, ~1e154 in fp64): such a row is normalized as x·s, with s the power of two that
    brings its largest magnitude into [2, 4) (exact, and never subnormal, so x·s = x / 2^e), which
    changes neither x / |x| nor its derivative s·J(x·s) = J(x). Other rows have s = 1; a row with an
    infinite entry keeps s = 1 (its results are NaN, as the kernels')."""
    with torch.no_grad():
        largest = x.detach().abs().amax(1, keepdim=True)
        overflowed = torch.isinf(x.detach().square().sum(1, keepdim=True)) & torch.isfinite(largest)
        scale = torch.where(overflowed, torch.ldexp(torch.ones_like(largest), 2 - torch.frexp(largest).exponent), 1)
    return F.normalize(x * scale, dim=1)


SIMILARITY_METRICS = ("cosine", "euclidean")


def check_metric(metric: object) -> str:
    """``metric`` names a similarity metric: ``"cosine"`` or ``"euclidean"``."""
    if not isinstance(metric, str) or metric not in SIMILARITY_METRICS:
        raise ValueError(f'metric must be "cosine" or "euclidean", got {metric!r}')
    return metric


def similarity(features: Tensor, prototypes: Tensor, temperature: float, metric: str = "cosine") -> Tensor:
    """cos(f, c_k) / τ (``metric="cosine"``) or -||f - c_k||₂ / τ (``"euclidean"``) for (N, D) features
    -> (N, K), or (B, D, H, W) -> (B, K, H, W).

    Computed in the accumulation dtype also under ``torch.autocast``, which would otherwise run
    the matrix product in 16 bits (as the kernels never do). Cosines are computed without overflow
    for huge finite values (:func:`normalize`). Distances are norms of the differences
    (``torch.linalg.vector_norm``, whose gradient is 0 at distance 0), held as one (.., K, D)
    tensor: the spec, not a fast form."""
    check_metric(metric)
    acc = accumulation_dtype(features.dtype)
    device = features.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
        f, c = features.to(acc), prototypes.to(acc)
        if metric == "euclidean":
            pixels_last = f if f.dim() == 2 else f.movedim(1, -1)
            distances: Tensor = torch.linalg.vector_norm(pixels_last.unsqueeze(-2) - c, dim=-1)
            logits = -(distances if f.dim() == 2 else distances.movedim(-1, 1))
        else:
            f, c = normalize(f), normalize(c)
            logits = f @ c.T if features.dim() == 2 else torch.einsum("bdhw,kd->bkhw", f, c)
    return (logits / temperature).to(features.dtype)


def valid_prior(class_prior: Tensor) -> Tensor:
    """Whether every entry of the prior is positive and finite (a 0-d bool tensor)."""
    prior = class_prior.double()
    return torch.isfinite(prior).all() & (prior > 0).all()


def normalized_log_prior(class_prior: Tensor, acc: torch.dtype) -> Tensor:
    """(B, 1, K) log(r / sum r) of a (B, K) prior, in fp64 as log r - log max r - log sum(r / max r)
    (no sum overflows and no logarithm is of a quotient that underflowed, whatever the prior's
    dtype), cast to ``acc``."""
    prior = class_prior.double()
    largest = prior.amax(-1, keepdim=True)
    scale = largest.log() + (prior / largest).sum(-1, keepdim=True).log()
    return (prior.log() - scale).to(acc)[:, None, :]


NON_FINITE_SCORES = ("balanced_sinkhorn: scores have NaN or infinite values, or one class's scores spread so widely "
                     "that (scores - their maximum) / epsilon overflows")


def scaled_scores(scores: Tensor, reference: Tensor, epsilon: float) -> Tensor:
    """x = (S - R)/ε for a per-class reference score R, subtracted in score units; raises when an x
    is not finite (a NaN or infinite score, or a class spread so widely that (S - R)/ε overflows)."""
    scaled = (scores - reference) / epsilon
    if has_values(scaled) and not torch.isfinite(scaled).all():
        raise ValueError(NON_FINITE_SCORES)
    return scaled


def balanced_sinkhorn(scores: Tensor, class_prior: Tensor, epsilon: float, num_iters: int) -> Tensor:
    """Class-balanced Sinkhorn-Knopp on B problems: scores (B, N, K), class_prior (B, K).

    The official iteration (CPSL, after SwAV) is, per problem, with r = prior / sum(prior)::

        Q = exp(S / ε).T;  Q /= Q.sum()
        repeat num_iters times:
            Q /= Q.sum(1, keepdim=True);  Q *= r[:, None]    # class k sums to r_k
            Q /= Q.sum(0, keepdim=True);  Q /= N             # every sample sums to 1/N
        return (N * Q).T

    That overflows exp for ε below ~0.011 in fp32. Here it is run with log-domain class potentials
    a_k: after the last column step the result is the row softmax of x + a, and one iteration is
    a_k = log r_k - logsumexp_i(x_ik) first, then a_k += log(N r_k) - log(sum_i softmax(x_i + a)_k),
    with x = (S - max_i S_ik)/ε: the first step normalizes each class, so subtracting each class's
    largest score changes nothing, and done in score units it keeps a constant added to one class
    (a masked class, however large the constant) from changing the result in floating point too.
    """
    acc = accumulation_dtype(scores.dtype)
    if has_values(class_prior) and not valid_prior(class_prior):
        raise ValueError("balanced_sinkhorn: class_prior must be positive and finite in every class")
    log_prior = normalized_log_prior(class_prior, acc)
    if scores.numel() == 0:
        return scores.clone()
    values = scores.to(acc)
    scaled = scaled_scores(values, values.amax(dim=1, keepdim=True), epsilon)
    log_num_samples = math.log(scores.shape[1])
    potential = log_prior - scaled.logsumexp(dim=1, keepdim=True)
    for _ in range(num_iters - 1):
        column_mass = (scaled + potential).softmax(dim=-1).sum(dim=1, keepdim=True)
        potential = potential + log_prior + log_num_samples - column_mass.clamp_min(torch.finfo(acc).tiny).log()
    return (scaled + potential).softmax(dim=-1).to(scores.dtype)


def update_prototypes(
    prototypes: Tensor, features: Tensor, labels: Tensor, momentum: float, ignore_index: int
) -> Tuple[Tensor, Tensor]:
    """Class-wise masked means of features, then p_k <- m p_k + (1 - m) mean_k for present classes.

    features (N, D) or (B, D, H, W); labels (N,) or (B, H, W). Returns (new_prototypes, counts).
    Class sums are taken in fp64 whatever the dtype, so a mean over any number of pixels keeps
    the precision of the features. A label outside [0, K) that is not ``ignore_index``, or a
    non-finite feature of a pixel that is not ignored, raises a ValueError.
    """
    num_classes, dim = prototypes.shape
    acc = accumulation_dtype(features.dtype)
    flat_features = features if features.dim() == 2 else features.permute(0, 2, 3, 1).reshape(-1, dim)
    flat_labels = labels.reshape(-1).long()
    valid = flat_labels != ignore_index
    out_of_range = valid & ((flat_labels < 0) | (flat_labels >= num_classes))
    if has_values(labels) and out_of_range.any():
        bad = flat_labels[out_of_range][0].item()
        raise ValueError(
            f"update_prototypes: labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}, found {bad}"
        )
    counted = flat_features.double().where(valid[:, None], 0)  # ignored pixels may hold anything
    if has_values(counted) and not torch.isfinite(counted).all():
        raise ValueError("update_prototypes: features must be finite at every pixel that is not ignored")
    # Ignored pixels go to an extra class K that is dropped: no shape depends on the values.
    one_hot = F.one_hot(torch.where(valid, flat_labels, num_classes), num_classes + 1)[:, :num_classes].double()
    counts = one_hot.sum(0)
    means = ((one_hot.T @ counted) / counts.clamp_min(1)[:, None]).to(acc)
    old = prototypes.to(acc)
    updated = torch.where((counts > 0)[:, None], momentum * old + (1 - momentum) * means, old)
    return updated.to(prototypes.dtype), counts.long()


def rectify_pseudo_labels(
    soft_pseudo_labels: Tensor, prototype_logits: Tensor, threshold: float, ignore_index: int
) -> Tuple[Tensor, Tensor]:
    """labels = argmax_k p_k softmax(l)_k; confidence = max_k(p_k softmax(l)_k) / sum_k(...).

    The softmax normalizer cancels in both, so w = log p + l is enough and never divides 0 by 0.
    Pixels under ``threshold``, or whose soft label has no mass, get ``ignore_index``.
    """
    acc = accumulation_dtype(soft_pseudo_labels.dtype)
    p = soft_pseudo_labels.to(acc)
    logits = prototype_logits.to(acc)
    if has_values(p) and not (torch.isfinite(p).all() and (p >= 0).all() and torch.isfinite(logits).all()):
        raise ValueError(
            "rectify_pseudo_labels: soft_pseudo_labels must be finite and non-negative and prototype_logits finite"
        )
    # w = log p + l relative to the largest logit of a class with mass, a shift that changes no
    # softmax: next to a large logit (1e8 in fp32) log p would otherwise be rounded away.
    shift = logits.masked_fill(p <= 0, -math.inf).amax(dim=1, keepdim=True)
    w = p.log() + (logits - shift.masked_fill(shift == -math.inf, 0))
    best, labels = w.max(dim=1)
    has_mass = best > -math.inf
    confidence = torch.where(has_mass, (best - w.logsumexp(dim=1)).exp(), torch.zeros_like(best))
    labels = torch.where(has_mass & (confidence >= threshold), labels, torch.full_like(labels, ignore_index))
    return labels, confidence.to(soft_pseudo_labels.dtype)
