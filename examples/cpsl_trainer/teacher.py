"""The mean teacher of stage 1: an exponential moving average of the student's weights."""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

import torch
from torch import Tensor, nn

from .distributed import Distributed, synchronize_batch_norm


class EMATeacher:
    """A frozen copy of ``student`` that follows it: after each step its parameters move to
    m·teacher + (1 − m)·student and its buffers (BatchNorm statistics) are the student's.

    As in the official code the teacher stays in training mode (batch statistics, dropout). Under
    torchrun its BatchNorm runs over the global batch like the student's. Its state is the
    network's own (a checkpoint holds the same keys as a weights file).
    """

    def __init__(self, student: nn.Module, momentum: float, dist: Distributed, device: torch.device) -> None:
        network = copy.deepcopy(student)
        for param in network.parameters():
            param.requires_grad_(False)
        self.network = synchronize_batch_norm(network, dist, device)
        self.momentum = momentum

    def __call__(self, images: Tensor) -> Dict[str, Tensor]:
        return self.network(images)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for ema_param, param in zip(self.network.parameters(), student.parameters()):
            ema_param.lerp_(param.detach(), 1.0 - self.momentum)
        for ema_buffer, buffer in zip(self.network.buffers(), student.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> Dict[str, Any]:
        return self.network.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> Any:
        return self.network.load_state_dict(state)
