"""The ops over a ``torch.distributed`` process group: the result on every rank is that of the
single-process op on the concatenation of all ranks' inputs.

Only PyTorch's own collectives are used, in the no-grad part of each op, as few as the math
allows, and every rank issues the same ones in the same order whatever its inputs (even none),
so bad values on one rank make every rank raise the same ``ValueError`` instead of leaving the
others waiting in a collective.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from cpsl_ops.reference import NON_FINITE_SCORES, accumulation_dtype, normalized_log_prior, valid_prior

LocalUpdate = Callable[[Tensor, Tensor, Tensor, float, int], Tuple[Tensor, Tensor]]


def active_group(process_group: Optional[dist.ProcessGroup]) -> Optional[dist.ProcessGroup]:
    """``process_group`` when it spans more than one process; None (single process) when it is
    None, torch.distributed is unavailable or uninitialized, or the group has one rank."""
    if process_group is None or not dist.is_available() or not dist.is_initialized():
        return None
    return process_group if dist.get_world_size(process_group) > 1 else None


def balanced_sinkhorn(
    scores: Tensor, class_prior: Tensor, epsilon: float, num_iters: int, group: dist.ProcessGroup
) -> Tensor:
    """:func:`cpsl_ops.reference.balanced_sinkhorn` of (B, N_r, K) ``scores`` whose problem b is
    the concatenation over ranks of every rank's problem b; returns this rank's rows.

    The log-domain class potentials need, over all ranks, the per-class maximum and minimum score,
    the log-sum-exp of x = (S - maximum)/ε and N first (one all-gather that also carries a
    bad-input flag), then the per-class column masses in each later iteration (one all-reduce):
    ``num_iters`` collectives in all, of B·K numbers.
    """
    acc = accumulation_dtype(scores.dtype)
    batch, samples, classes = scores.shape
    values = scores.to(acc)
    # x = (S - M)/ε with M each class's largest score over all ranks, as in the reference: each rank
    # sends its own maxima with its log-sum-exps relative to them, then rescales to M. The flag
    # stays on the device: no host sync before the collective. A bad shard's log-sum-exp (NaN or
    # inf) is never used, as every rank raises below; an empty shard's is -inf, which adds nothing
    # over ranks. fp64 keeps N exact past 2^24 samples.
    if samples:
        local_max, local_min = values.amax(dim=1), values.amin(dim=1)
    else:
        local_max = values.new_full((batch, classes), -math.inf)
        local_min = values.new_full((batch, classes), math.inf)
    local = (values - local_max[:, None, :]) / epsilon
    bad = ~(torch.isfinite(local).all() & valid_prior(class_prior))
    packed = torch.cat([local.logsumexp(dim=1).flatten().double(), local_max.flatten().double(),
                        local_min.flatten().double(), scores.new_tensor([samples], dtype=torch.float64),
                        bad.double().reshape(1)])
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    everyone = torch.stack(gathered)
    rank_lse, rank_max, rank_min = everyone[:, :-2].view(len(gathered), 3, batch, classes).unbind(1)
    global_max = rank_max.amax(dim=0)
    # A class whose scores are finite on every rank may still spread so widely over the ranks that
    # its smallest x, (min - M)/ε in the accumulation dtype as the reference takes it, overflows:
    # every rank sees the same extremes, so every rank raises alike.
    overflow = ~torch.isfinite((rank_min.amin(dim=0).to(acc) - global_max.to(acc)) / epsilon).all()
    flags = torch.cat([everyone[:, -2:].sum(dim=0), overflow.double().reshape(1)])
    total_samples, bad_ranks, spread_overflow = flags.tolist()  # one host sync for all three
    if bad_ranks or (total_samples and spread_overflow):
        raise ValueError(f"{NON_FINITE_SCORES} on some rank, or a class_prior entry that is not positive and finite")
    if total_samples == 0:
        raise ValueError("balanced_sinkhorn: no rank of the process group has any sample (N = 0 on every rank)")
    log_prior = normalized_log_prior(class_prior, acc)
    # Each rank's log-sum-exp moved from its own maxima to the global ones (-inf for empty shards).
    moved = rank_lse + (rank_max - global_max) / epsilon
    global_lse = moved.logsumexp(dim=0).to(acc)
    scaled = (values - global_max.to(acc)[:, None, :]) / epsilon
    potential = log_prior - global_lse[:, None, :]
    for _ in range(num_iters - 1):
        column_mass = (scaled + potential).softmax(dim=-1).sum(dim=1)
        dist.all_reduce(column_mass, group=group)
        potential = (potential + log_prior + math.log(total_samples)
                     - column_mass.clamp_min(torch.finfo(acc).tiny).log()[:, None, :])
    return (scaled + potential).softmax(dim=-1).to(scores.dtype)


def update_prototypes(
    prototypes: Tensor,
    features: Tensor,
    labels: Tensor,
    momentum: float,
    ignore_index: int,
    group: dist.ProcessGroup,
    local_update: LocalUpdate,
) -> Tuple[Tensor, Tensor]:
    """The EMA step with class means over all ranks' pixels; returns (new prototypes, counts).

    ``local_update`` is the single-process op (native kernel or reference): with momentum 0 on a
    zero buffer it gives this rank's class means and counts at the kernel's speed, and its
    ValueError for a bad label or a non-finite feature. Class sums, counts and the number of ranks
    with each error travel in one all-reduce of a (K, D + 3) fp64 buffer (exact counts, and sums as
    precise as the means).
    """
    num_classes, dim = prototypes.shape
    acc = accumulation_dtype(prototypes.dtype)
    buffer = prototypes.new_zeros((num_classes, dim + 3), dtype=torch.float64)
    bad_label, bad_feature = dim + 1, dim + 2
    try:
        means, counts = local_update(prototypes.new_zeros((num_classes, dim), dtype=acc), features.to(acc), labels,
                                     0.0, ignore_index)
        buffer[:, :dim] = means.double() * counts[:, None]
        buffer[:, dim] = counts
    except ValueError as error:  # every rank must learn it, after the collective
        buffer[0, bad_feature if "features must be finite" in str(error) else bad_label] = 1
    dist.all_reduce(buffer, group=group)
    if buffer[0, bad_label] > 0:
        raise ValueError(
            f"update_prototypes: some rank has a label outside [0, {num_classes}) that is not "
            f"ignore_index={ignore_index}; no prototype was changed"
        )
    if buffer[0, bad_feature] > 0:
        raise ValueError("update_prototypes: some rank has a NaN or infinite feature at a pixel that is not ignored; "
                         "no prototype was changed")
    counts = buffer[:, dim]
    present = counts > 0
    means = buffer[:, :dim] / counts.clamp_min(1)[:, None]
    old = prototypes.to(torch.float64)
    updated = torch.where(present[:, None], momentum * old + (1 - momentum) * means, old)
    return updated.to(prototypes.dtype), counts.long()


def class_counts(labels: Tensor, num_classes: int, ignore_index: int, group: Optional[dist.ProcessGroup]) -> Tensor:
    """(K,) int64 histogram of the valid labels of all ranks (one all-reduce, which also carries
    the number of out-of-range labels); raises on every rank if any rank has one, or if no rank
    has a label other than ``ignore_index``."""
    flat = labels.reshape(-1).long()
    valid = flat != ignore_index
    in_range = valid & (flat >= 0) & (flat < num_classes)
    # Out-of-range labels are counted in an extra bin K; no shape depends on the values.
    counts = torch.zeros(num_classes + 1, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, torch.where(in_range, flat, num_classes), valid.long())
    if group is not None:
        dist.all_reduce(counts, group=group)
    if not counts.is_meta and counts[-1] > 0:
        bad = flat[valid & ~in_range]
        found = f"found values in [{int(bad.min())}, {int(bad.max())}]" if group is None else "some rank has others"
        raise ValueError(
            f"class_distribution: labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}, {found}"
        )
    if not counts.is_meta and counts.sum() == 0:
        raise ValueError(f"class_distribution: every label equals ignore_index={ignore_index}; the prior is undefined")
    return counts[:-1]
