"""torchrun support: the process group, synchronized BatchNorm and the rank-0-only chores.

Under ``torchrun --nproc-per-node=N`` every process trains a DistributedDataParallel replica on
its share of each global batch; with one process (plain ``python``) everything here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

# Rank 0 alone writes pseudo labels and evaluates while the other ranks wait at a barrier: on the
# full Cityscapes train set that takes minutes, longer than the collectives' 10-minute default.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: ``group`` is None when it runs alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Optional[dist.ProcessGroup] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_type: str) -> "Distributed":
        """Joins the torchrun job described by WORLD_SIZE/RANK/LOCAL_RANK (NCCL on GPUs, gloo on
        CPUs), or returns the single-process context when WORLD_SIZE is unset or 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, dist.group.WORLD)

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(self.group)

    def share(self, global_batch: int) -> int:
        """This rank's number of images of a global batch of ``global_batch``."""
        if global_batch < 1 or global_batch % self.world_size:
            raise ValueError(f"data.batch_size is the global batch and must be a positive multiple of the "
                             f"{self.world_size} processes, got {global_batch}")
        return global_batch // self.world_size

    def rows(self, per_rank: int) -> slice:
        """This rank's rows of something drawn for a global batch of ``per_rank`` images per rank."""
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def gather_batch(self, tensor: Tensor) -> Tensor:
        """The concatenation over the ranks, in rank order, of a batch of the same shape on every
        rank: the global batch (no gradient flows back through it)."""
        if self.group is None:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts)

    def mean(self, values: Dict[str, float]) -> Dict[str, float]:
        """The mean of each scalar over the ranks (what rank 0 logs)."""
        if self.group is None:
            return values
        packed = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(packed, group=self.group)
        return dict(zip(values, (packed / self.world_size).tolist()))

    def average_gradients(self, parameters: List[nn.Parameter]) -> None:
        """Averages gradients that DDP does not own (e.g. the self-labeling prototypes)."""
        if self.group is None:
            return
        for param in parameters:
            if param.grad is not None:
                dist.all_reduce(param.grad, group=self.group)
                param.grad.div_(self.world_size)

    def close(self) -> None:
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group()


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole global batch, for CPU (gloo) runs.

    ``nn.SyncBatchNorm`` has CUDA kernels only. This computes the per-channel sums and sums of
    squares of all ranks with one differentiable all-reduce, so the forward and the backward are
    those of BatchNorm on the concatenated batch, as SyncBatchNorm's are on GPUs.
    """

    group: Optional[dist.ProcessGroup] = None

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.group is None:
            return super().forward(input)
        channels = input.shape[1]
        count = input.new_full((1,), input.numel() / channels)
        local = torch.cat([input.sum((0, 2, 3)), input.square().sum((0, 2, 3)), count])
        total = _SumOverRanks.apply(local, self.group)
        sums, squares, pixels = total[:channels], total[channels:-1], total[-1]
        mean = sums / pixels
        variance = (squares / pixels - mean.square()).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(variance.detach() * pixels / (pixels - 1).clamp_min(1), self.momentum)
        scale = torch.rsqrt(variance + self.eps) * self.weight
        return input * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]


def synchronize_batch_norm(model: nn.Module, context: Distributed, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch when there is more than one rank: ``nn.SyncBatchNorm`` on
    GPUs, :class:`CPUSyncBatchNorm` on CPUs; the model is returned unchanged otherwise."""
    if context.group is None:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, context.group)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
            # The same parameter and buffer objects: an optimizer built on the model stays valid.
            synced.weight, synced.bias = child.weight, child.bias
            synced.running_mean, synced.running_var = child.running_mean, child.running_var
            synced.num_batches_tracked = child.num_batches_tracked
            synced.train(child.training)
            synced.group = context.group
            setattr(model, name, synced)
        else:
            synchronize_batch_norm(child, context, device)
    return model

