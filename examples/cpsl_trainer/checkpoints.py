"""Checkpoints of a run: ``last.pt`` to resume exactly, each stage's last and best weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import Tensor

from .config import Config, config_from_dict, flat_settings
from .distributed import Distributed
from .files import keep_log_lines, load_torch_file


# Raised whenever a change of the trainer makes an older last.pt resume differently from the run
# that wrote it (2: the global batch under torchrun, RandAugmentMC, one memory bank; 3: the official
# effective backbone step, optim.py; 4: align_corners on stride-8 maps, antialiased weak crops,
# CutMix from the source loss's crop, FCDiscriminator, the supervised-contrastive term).
CHECKPOINT_FORMAT = 4


# Settings that decide what a run shows and writes, or the memory it takes, never what it
# computes: a resumed run may change them.
RESUMABLE_CHANGES = ("train.output_dir", "train.stop_after", "train.progress", "train.log_every", "train.tensorboard",
                     "train.checkpoint_every", "data.num_workers", "eval.save_images", "model.checkpoint_backbone")


def config_changes(saved: Config, current: Config) -> List[str]:
    """``"key: saved there, current here"`` for each setting that differs, RESUMABLE_CHANGES aside."""
    before, after = flat_settings(saved.to_dict()), flat_settings(current.to_dict())
    return [f"{key}: {before.get(key)!r} there, {value!r} here" for key, value in after.items()
            if key not in RESUMABLE_CHANGES and before.get(key) != value]


class Checkpoints:
    """What a run writes to resume and to hand weights from stage to stage.

    ``state`` holds the completed stages, their metrics and each stage's best evaluation; it is
    saved with every checkpoint. ``resumed_modules`` holds the modules' states of a loaded
    checkpoint until the stage they belong to restores them.
    """

    def __init__(self, config: Config, dist: Distributed, output: Path) -> None:
        self.config, self.dist, self.output = config, dist, output
        self.state: Dict[str, Any] = {"completed": [], "metrics": {}, "best": {}}
        self.resumed_modules: Dict[str, Any] = {}

    @property
    def checkpoint_path(self) -> Path:
        return self.output / "checkpoints" / "last.pt"

    def save(self, stage: str, iteration: int, modules: Dict[str, Any]) -> None:
        """Rank 0 writes one file: every module's state is the same on every rank."""
        if not self.dist.is_main:
            return
        payload = {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "stage": stage, "iteration": iteration,
                   "completed": self.state["completed"], "metrics": self.state["metrics"], "best": self.state["best"],
                   "world_size": self.dist.world_size,
                   "modules": {name: module.state_dict() for name, module in modules.items()}}
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.checkpoint_path.with_suffix(".tmp")
        torch.save(payload, partial)
        os.replace(partial, self.checkpoint_path)  # a job killed while saving leaves the last good one

    def load(self, path: Path) -> None:
        """Reads ``path`` with nothing but tensors and plain values unpickled (a crafted file runs no
        code: it is refused, named), then checks that it resumes this run exactly."""
        payload = load_torch_file(path)
        if not isinstance(payload, dict) or not {"config", "stage", "iteration", "modules"} <= payload.keys():
            raise ValueError(f"{path} is not a checkpoint written by this trainer (checkpoints/last.pt)")
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} was written by an earlier version of the trainer, whose batches, augmentation "
                             f"or optimizer differ, so it cannot be resumed exactly: start the run again (its stage weights, "
                             f"checkpoints/<stage>.pt, still serve as warmup.weights or evaluate --weights)")

        changes = config_changes(config_from_dict(payload["config"]), self.config)
        if changes:
            raise ValueError(f"{path} was written with another config, which would not resume exactly: "
                             f"{'; '.join(changes)}. Only {', '.join(RESUMABLE_CHANGES)} may change on resume")
        if payload["world_size"] != self.dist.world_size:
            raise ValueError(f"{path} was written by {payload['world_size']} processes; resume with as many "
                             f"(torchrun --nproc-per-node={payload['world_size']}), not {self.dist.world_size}")
        self.state = {key: payload[key] for key in ("stage", "iteration", "completed", "metrics", "best")}
        self.resumed_modules = payload["modules"]  # released once restored (a ResNet-101 run's is ~1 GB)
        if self.dist.is_main:  # the resumed run logs again what came after the checkpoint
            completed, stage, iteration = set(payload["completed"]), payload["stage"], payload["iteration"]
            keep_log_lines(self.output / "log.jsonl", lambda entry: entry["stage"] in completed or (
                entry["stage"] == stage and entry["iteration"] <= iteration))

    def resume_modules(self, stage: str, modules: Dict[str, Any]) -> int:
        """Restores ``modules`` if the checkpoint stopped inside ``stage``; returns the start iteration."""
        if self.state.get("stage") != stage or stage in self.state["completed"]:
            return 0
        for name, module in modules.items():
            module.load_state_dict(self.resumed_modules[name])
        self.resumed_modules = {}
        return int(self.state["iteration"])

    def stage_weights(self, stage: str) -> Path:
        """The weights at the end of ``stage``."""
        return self.output / "checkpoints" / f"{stage}.pt"

    def best_weights(self, stage: str) -> Path:
        """The weights of ``stage``'s best evaluation on the target val set (its end included)."""
        return self.output / "checkpoints" / f"{stage}_best.pt"

    def selected_weights(self, stage: str) -> Path:
        """What ``stage`` hands on to the next stage and reports: its best or its last weights."""
        return self.best_weights(stage) if self.config.eval.select == "best" else self.stage_weights(stage)

    def keep_if_best(self, stage: str, iteration: int, result: Dict[str, Any], weights: Dict[str, Tensor]) -> None:
        """Main rank: records an evaluation, and saves ``weights`` as the stage's best unless an
        earlier evaluation of the stage scored higher (a tie goes to the later, as officially)."""
        best = self.state["best"].get(stage)
        if best is None or result["mIoU"] >= best["result"]["mIoU"]:
            self.best_weights(stage).parent.mkdir(parents=True, exist_ok=True)
            torch.save(weights, self.best_weights(stage))
            self.state["best"] = {**self.state["best"], stage: {"iteration": iteration, "result": result}}
