"""The public functional API of cpsl-ops.

Every function validates shapes, dtypes and devices here, then runs the native kernel
(``torch.ops.cpsl_ops.*``) where the build has one for the tensors' device, or the pure-PyTorch
reference (:mod:`cpsl_ops.reference`) otherwise or when the reference backend is selected
(:func:`cpsl_ops.set_backend`). Values (NaN, label range, prior sign) are checked by the kernels.
The reference runs as ops too (``torch.ops.cpsl_ops_reference.*``, :mod:`cpsl_ops.ops`), with the
native ops' fake kernels, so that on both backends torch.compile, ``torch.export`` and
FakeTensorMode trace around the value checks; ``prototype_similarity``'s reference, which checks
no value, is traced as the PyTorch ops it is.
With a ``process_group`` of more than one rank, :func:`balanced_sinkhorn`,
:func:`update_prototypes_` and :func:`class_distribution` run their :mod:`cpsl_ops.distributed`
form instead, which returns the single-process result on the concatenation of all ranks' inputs.

On CUDA each native op synchronizes with the host once, to raise a ``ValueError`` on bad values.
While its stream is being captured into a CUDA graph it cannot, so it does not: at replay, bad
values make its outputs NaN instead (the Sinkhorn assignment, the updated prototypes, the
rectified confidence, with every rectified label ``ignore_index``). Results do not depend on
TF32 or deterministic-algorithm settings: the kernels use no cuBLAS and no atomics.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.distributed import ProcessGroup

from cpsl_ops import distributed, reference
from cpsl_ops import ops as _ops  # noqa: F401  (fake kernels, autograd, the reference backend's ops)
from cpsl_ops._loader import use_native
from cpsl_ops._validation import (
    INTEGER_DTYPES,
    check_int,
    check_metric,
    check_nonzero,
    check_number,
    check_positive,
    check_same_device,
    check_tensor,
    check_unit_interval,
)

__all__ = [
    "prototype_similarity",
    "balanced_sinkhorn",
    "update_prototypes_",
    "rectify_pseudo_labels",
    "class_distribution",
]


def prototype_similarity(
    features: Tensor, prototypes: Tensor, temperature: float = 0.08, metric: str = "cosine"
) -> Tensor:
    """Similarity of every pixel feature with every prototype, divided by ``temperature``: the
    cosine (CPSL) or the negated euclidean distance (ProDA, DiGA).

    Args:
        features: (N, D) or channel-first (B, D, H, W) pixel features; fp16, bf16, fp32 or fp64.
        prototypes: (K, D) class prototypes, on the same device; cast to the dtype of ``features``.
        temperature: τ > 0 (CPSL: 0.08 with the cosine; ProDA's euclidean logits use 1), at least
            the smallest normal number of the dtype of the computation (fp32, or fp64 for fp64
            features: 1.2e-38, 2.2e-308).
        metric: ``"cosine"``: ``cos(f, c_k) / τ``, or ``"euclidean"``: ``-||f - c_k||₂ / τ``, the
            prototypes used as they are (not normalized).

    Returns:
        (N, K) or (B, K, H, W) logits in the dtype of ``features``, computed in fp32 (fp64 for
        fp64 features), differentiable with respect to both inputs, in every mode: reverse mode
        and double backward natively, forward mode and ``torch.func`` transforms (grad, jacrev,
        jvp, vmap) through the reference's formulas (PyTorch ops). The native kernels work on
        tiles of pixels on the fly: no normalized copy of the features, and no (N, K, D)
        difference, is written to memory.

        Cosine: norms are clamped at 1e-12 as in ``F.normalize``, and computed without overflow:
        huge finite values (above ~1e19 in fp32) give the cosines of the same rows scaled down.

        Euclidean: each distance is summed from the differences, exact where a pixel sits on its
        prototype, where its gradient is 0 (as ``torch.linalg.vector_norm``'s: the distance has no
        derivative there, and its second derivative there is NaN); it is infinite where the sum of
        squares overflows (differences above ~1e19 in fp32), as ``vector_norm``'s.

        No value is checked: a pixel with a NaN or infinite feature gets NaN logits (every class
        for the cosine; the euclidean distance to an infinite feature is infinite), the other pixels
        are unaffected; a prototype with one does the same to its class's logits at every pixel.
    """
    metric = check_metric(metric)
    check_tensor(features, "features", (2, 4), "(N, D) or (B, D, H, W)")
    check_tensor(prototypes, "prototypes", (2,), "(K, D)")
    check_same_device(features, "features", prototypes, "prototypes")
    if features.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"features have D = {features.shape[1]} channels (dim 1) but prototypes have D = {prototypes.shape[1]}"
        )
    check_nonzero(prototypes.shape[0], "prototypes (K)")
    check_nonzero(prototypes.shape[1], "the feature dimension D")
    temperature = check_positive(temperature, "temperature", features.dtype)
    prototypes = prototypes.to(features.dtype)
    if use_native("similarity", features.device) and not _under_function_transform(features, prototypes):
        logits: Tensor = torch.ops.cpsl_ops.similarity(features, prototypes, temperature, metric)
        return logits
    return reference.similarity(features, prototypes, temperature, metric)


def _under_function_transform(*tensors: Tensor) -> bool:
    """Whether forward-mode AD or a ``torch.func`` transform (grad, jacrev, jvp, vmap, ...) sees these
    tensors. The native op's autograd serves reverse mode only (the formula PyTorch's
    ``register_autograd`` takes), so there the reference's PyTorch formulas, which serve every
    transform, compute the result instead of the kernel."""
    if torch.compiler.is_compiling():
        return False
    # unpack_dual has no annotations in torch's source (it returns a (primal, tangent) namedtuple).
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t)
               or forward_ad.unpack_dual(t).tangent is not None  # type: ignore[no-untyped-call]
               for t in tensors)


def balanced_sinkhorn(
    scores: Tensor,
    class_prior: Optional[Tensor] = None,
    epsilon: float = 0.05,
    num_iters: int = 3,
    process_group: Optional[ProcessGroup] = None,
) -> Tensor:
    """Class-balanced Sinkhorn-Knopp assignment of CPSL (SwAV's with a class prior).

    For each problem, with Q = exp(S/ε)ᵀ normalized to sum 1, ``num_iters`` times: scale class
    rows to the prior r, then sample columns to 1/N; return N·Qᵀ. This is computed in a
    log-domain form that returns the same values and stays finite for ε down to 0.01 and for
    fp16/bf16 scores.

    Args:
        scores: (N, K) or (B, N, K) for B independent problems (e.g. cosine similarities).
        class_prior: (K,) or (B, K) positive class marginal, normalized internally; None is
            uniform (SwAV). CPSL uses the warm-up model's class distribution
            (:func:`class_distribution`).
        epsilon: entropic regularization ε > 0 (CPSL: 0.05), at least the smallest normal number of
            the dtype of the computation (fp32, or fp64 for fp64 scores: 1.2e-38, 2.2e-308).
        num_iters: iterations T >= 1 (CPSL: 3).
        process_group: a ``torch.distributed`` group whose ranks each hold some samples (rows)
            of the same problems. Each rank gets its rows of the assignment of the concatenated
            problems, as SwAV's distributed Sinkhorn does with CPSL's prior. Every rank must pass
            the same B, K, prior, ε and T; a rank may hold zero samples. The fused single kernel
            is then replaced by a PyTorch loop with one collective of B·K numbers per iteration
            (``cpsl_ops.distributed``). None, an uninitialized torch.distributed or a world size
            of 1 mean a single process.

    Returns:
        Assignment of the shape and dtype of ``scores``; each row sums to 1. No gradient flows.
        Adding a constant to one class's scores leaves it unchanged, however large the constant
        (so a class masked with a large negative score is balanced like any other): every
        backend subtracts each class's largest score before dividing by ε. On the CPU an
        assignment of 8 MiB or more reuses the memory of the last one freed (the OS would zero
        fresh pages, a seventh of the time at N = 1M): its storage cannot grow, so ``resize_``
        to more elements or an ``out=`` of a larger shape raises (``clone()`` it first, or set
        ``CPSL_OPS_RECYCLE_OUTPUTS=0``).

    Raises:
        ValueError: on NaN or infinite scores, a class whose scores spread so widely that
            (scores - their maximum) / ε overflows, a prior entry that is not positive, or N = 0 (with
            a group: on every rank, when any rank has bad values or no rank has a sample). Shape,
            dtype, device and argument errors are raised before any communication, on the ranks
            that make them only: the others then wait in the first collective until the group's
            timeout.

    The CPU kernel keeps, per calling thread, a workspace the size of the largest problem it has
    solved (N × K floats), so that repeated calls do not page-fault fresh memory.
    """
    check_tensor(scores, "scores", (2, 3), "(N, K) or (B, N, K)")
    batched = scores.dim() == 3
    problems = scores if batched else scores.unsqueeze(0)
    batch, samples, classes = problems.shape
    group = distributed.active_group(process_group)
    if group is None:
        check_nonzero(samples, "scores (N samples)")
    check_nonzero(classes, "scores (K classes)")
    epsilon = check_positive(epsilon, "epsilon", scores.dtype)
    num_iters = check_int(num_iters, "num_iters", minimum=1)
    if class_prior is None:
        prior = problems.new_ones((batch, classes), dtype=torch.float32)
    else:
        check_tensor(class_prior, "class_prior", (1, 2), "(K,) or (B, K)")
        check_same_device(scores, "scores", class_prior, "class_prior")
        if class_prior.shape[-1] != classes or (class_prior.dim() == 2 and class_prior.shape[0] != batch):
            raise ValueError(
                f"class_prior must be ({classes},) or ({batch}, {classes}) to match scores, "
                f"got shape {tuple(class_prior.shape)}"
            )
        prior = class_prior.expand(batch, classes)
    assignment: Tensor
    with torch.no_grad():
        if group is not None:
            assignment = distributed.balanced_sinkhorn(problems.detach(), prior, epsilon, num_iters, group)
        elif use_native("balanced_sinkhorn", scores.device):
            assignment = torch.ops.cpsl_ops.balanced_sinkhorn(problems.detach(), prior, epsilon, num_iters)
        else:
            assignment = torch.ops.cpsl_ops_reference.balanced_sinkhorn(
                problems.detach(), prior, epsilon, num_iters
            )
    return assignment if batched else assignment.squeeze(0)


def _update_prototypes(
    prototypes: Tensor, features: Tensor, labels: Tensor, momentum: float, ignore_index: int
) -> Tuple[Tensor, Tensor]:
    """The single-process op on validated tensors: (new prototypes, counts)."""
    result: Tuple[Tensor, Tensor]  # torch.ops.* are untyped (Any); their schemas return these
    if use_native("update_prototypes", prototypes.device):
        result = torch.ops.cpsl_ops.update_prototypes(prototypes, features, labels, momentum, ignore_index)
    else:
        result = torch.ops.cpsl_ops_reference.update_prototypes(prototypes, features, labels, momentum, ignore_index)
    return result


def update_prototypes_(
    prototypes: Tensor,
    features: Tensor,
    labels: Tensor,
    momentum: float = 0.999,
    ignore_index: int = 255,
    process_group: Optional[ProcessGroup] = None,
) -> Tensor:
    """ProDA-style prototype update, in place: class-wise masked means with an EMA step.

    For every class k with at least one pixel labelled k:
    ``p_k <- momentum * p_k + (1 - momentum) * mean(features of pixels labelled k)``.
    Classes with no pixel keep their value.

    Args:
        prototypes: (K, D) tensor updated in place (a buffer or parameter; no gradient is recorded).
        features: (N, D) or (B, D, H, W), on the same device; cast to the dtype of ``prototypes``.
        labels: (N,) or (B, H, W) integer labels in [0, K) or ``ignore_index``.
        momentum: m in [0, 1]; 1 leaves the prototypes unchanged.
        ignore_index: label of pixels to skip.
        process_group: a ``torch.distributed`` group: the class means cover the pixels of all
            its ranks (class sums and counts are all-reduced in one fp64 collective before the
            EMA step), so every rank ends with the same prototypes. A rank may hold no pixel.

    Returns:
        (K,) int64 pixel count of each class (over all ranks with a group).

    Class sums are accumulated in fp64 on every backend, so a mean over any number of pixels
    keeps the precision of the features.

    Raises:
        ValueError: on a label outside [0, K) that is not ``ignore_index``, or a NaN or infinite
            feature at a pixel that is not ignored (nothing is written; with a group, on every
            rank when any rank has one). Shape, dtype and device errors are raised before any
            communication, as in :func:`balanced_sinkhorn`.
    """
    check_tensor(prototypes, "prototypes", (2,), "(K, D)")
    check_tensor(features, "features", (2, 4), "(N, D) or (B, D, H, W)")
    check_tensor(labels, "labels", (features.dim() - 1,), "(N,) for (N, D) features, (B, H, W) for (B, D, H, W)",
                 floating=False)
    check_same_device(prototypes, "prototypes", features, "features")
    check_same_device(features, "features", labels, "labels")
    if features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"features have D = {features.shape[1]} but prototypes have D = {prototypes.shape[1]}")
    pixel_shape = (features.shape[0],) if features.dim() == 2 else (features.shape[0], *features.shape[2:])
    if tuple(labels.shape) != pixel_shape:
        raise ValueError(f"labels must have shape {pixel_shape} to match features, got {tuple(labels.shape)}")
    check_nonzero(prototypes.shape[0], "prototypes (K)")
    momentum = check_unit_interval(momentum, "momentum")
    ignore_index = check_int(ignore_index, "ignore_index")
    with torch.no_grad():
        features = features.detach().to(prototypes.dtype)
        group = distributed.active_group(process_group)
        if group is None:
            updated, counts = _update_prototypes(prototypes.detach(), features, labels, momentum, ignore_index)
        else:
            updated, counts = distributed.update_prototypes(
                prototypes.detach(), features, labels, momentum, ignore_index, group, _update_prototypes
            )
        prototypes.copy_(updated)
    return counts


def rectify_pseudo_labels(
    soft_pseudo_labels: Tensor, prototype_logits: Tensor, threshold: float = 0.0, ignore_index: int = 255
) -> Tuple[Tensor, Tensor]:
    """CPSL's pseudo-label rectification: soft labels re-weighted by the prototype posterior.

    Args:
        soft_pseudo_labels: (B, K, H, W) class probabilities P_ST (e.g. the warm-up model's softmax).
        prototype_logits: (B, K, H, W) prototype logits, e.g. ``prototype_similarity(f, C_ema, τ)``
            (either metric); their softmax is P_SL.
        threshold: pixels whose confidence is below it get ``ignore_index`` (CPSL: 0, none); a
            number, not NaN.
        ignore_index: label for ignored pixels.

    Returns:
        (labels, confidence), both (B, H, W): labels = argmax_k P_ST·P_SL (int64) and confidence =
        max_k(P_ST·P_SL) / sum_k(P_ST·P_SL) in the inputs' promoted dtype. Pixels whose soft
        label is zero everywhere get ``ignore_index`` and confidence 0.

    ProDA's prototypical denoising (weights softmax(-T·||f - c_k||) times the soft labels, pixels
    below ``train_thred`` ignored) is this function with euclidean logits:
    ``rectify_pseudo_labels(P_ST, prototype_similarity(f, C, 1 / T, "euclidean"), train_thred)``.
    DiGA's bilateral consensus, which keeps a pseudo label only where the classifier and the
    nearest centroid agree, needs no kernel of its own:
    ``labels.masked_fill(P_ST.argmax(1) != prototype_logits.argmax(1), ignore_index)``.

    Raises:
        ValueError: on negative or non-finite soft labels or non-finite logits.
    """
    check_tensor(soft_pseudo_labels, "soft_pseudo_labels", (4,), "(B, K, H, W)")
    check_tensor(prototype_logits, "prototype_logits", (4,), "(B, K, H, W)")
    check_same_device(soft_pseudo_labels, "soft_pseudo_labels", prototype_logits, "prototype_logits")
    if soft_pseudo_labels.shape != prototype_logits.shape:
        raise ValueError(
            f"soft_pseudo_labels {tuple(soft_pseudo_labels.shape)} and prototype_logits "
            f"{tuple(prototype_logits.shape)} must have the same shape"
        )
    check_nonzero(soft_pseudo_labels.shape[1], "the class dimension K")
    threshold = check_number(threshold, "threshold")
    ignore_index = check_int(ignore_index, "ignore_index")
    dtype = torch.promote_types(soft_pseudo_labels.dtype, prototype_logits.dtype)
    soft, logits = soft_pseudo_labels.detach().to(dtype), prototype_logits.detach().to(dtype)
    rectified: Tuple[Tensor, Tensor]
    with torch.no_grad():
        if use_native("rectify_pseudo_labels", soft.device):
            rectified = torch.ops.cpsl_ops.rectify_pseudo_labels(soft, logits, threshold, ignore_index)
        else:
            rectified = torch.ops.cpsl_ops_reference.rectify_pseudo_labels(soft, logits, threshold, ignore_index)
    return rectified


def class_distribution(
    labels: Tensor, num_classes: int, ignore_index: int = 255, process_group: Optional[ProcessGroup] = None
) -> Tensor:
    """Normalized class histogram of ``labels``: the class prior r of :func:`balanced_sinkhorn`.

    CPSL computes it once from the warm-up model's argmax predictions on the target train set.

    Args:
        labels: integer tensor of any shape, values in [0, num_classes) or ``ignore_index``.
        num_classes: K >= 1.
        ignore_index: label to skip.
        process_group: a ``torch.distributed`` group: the histogram of all its ranks' labels
            (one all-reduce of the counts); a rank may hold none.

    Returns:
        (K,) float32 frequencies summing to 1. A class never seen gets 0: clamp it (e.g.
        ``prior.clamp_min(1e-6)``) before using it as a Sinkhorn prior, which must be positive.

    Raises:
        ValueError: on labels out of range, or when no label differs from ``ignore_index`` (with
            a group: on every rank, when any rank has labels out of range or no rank has a
            valid label).
    """
    if not isinstance(labels, Tensor) or labels.dtype not in INTEGER_DTYPES:
        raise TypeError(f"labels must be an integer torch.Tensor, got {getattr(labels, 'dtype', type(labels))}")
    num_classes = check_int(num_classes, "num_classes", minimum=1)
    ignore_index = check_int(ignore_index, "ignore_index")
    group = distributed.active_group(process_group)
    counts: Tensor
    if group is None:  # an op, so that torch.compile traces around its value checks
        counts = torch.ops.cpsl_ops.class_counts(labels, num_classes, ignore_index)
    else:
        counts = distributed.class_counts(labels, num_classes, ignore_index, group)
    counts = counts.to(torch.float32)
    return counts / counts.sum()
