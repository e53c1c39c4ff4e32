"""Activation checkpointing of the backbone's blocks, with BatchNorm statistics counted once.

A checkpointed block keeps only its input; its activations are recomputed in the backward pass.
In training mode the recomputation would run BatchNorm's running-statistics update a second time
(the same batch counted twice), so it runs with those updates frozen: the step's results, running
statistics included, are those of the plain step.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` normalize with batch statistics but leave their running
    statistics and batch counters as they were."""
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for norm in norms:
        norm.momentum = 0.0  # running <- (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, (momentum, count) in zip(norms, saved):
                norm.momentum = momentum
                norm.num_batches_tracked.copy_(count)


def checkpointed(block: nn.Module, x: Tensor) -> Tensor:
    """``block(x)``, its activations recomputed in the backward pass instead of kept."""
    return checkpoint(block, x, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), frozen_running_stats(block)))
