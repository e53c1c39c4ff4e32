"""Stage 0: the source-only warm-up, or adopting given warm-up weights."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from . import official
from .context import RunContext
from .model import load_weights
from .training import Draws, poly_lr


class WarmupStage(RunContext):
    """Stage 0: trains the source-only warm-up, or adopts ``warmup.weights``."""

    def warmup(self) -> None:
        stage, stage_config = "warmup", self.config.warmup
        if stage_config.weights:
            self.adopt_warmup_weights(Path(stage_config.weights))
            return
        model = self.stage_model(stage, self.config.model.pretrained).to(self.device).train()
        net = self.parallel(model)
        optimizer = self.optimizer(model, stage_config.optim)
        scaler = self.new_scaler()
        modules = {"model": model, "optimizer": optimizer, "scaler": scaler}
        start = self.resume_modules(stage, modules)
        source = self.source_batches(start)

        def step(iteration: int, draws: Draws) -> Dict[str, float]:
            lr = poly_lr(optimizer, stage_config.optim.lr, iteration, stage_config.iterations, stage_config.optim.poly_power)
            loss = self.source_loss(net, next(source), draws.shared)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            return {"loss_source": loss.item(), "lr": lr}

        self.train_loop(stage, start, stage_config.iterations, modules, step, model)

    def adopt_warmup_weights(self, path: Path) -> None:
        """Stage 0 without training: ``warmup.weights`` (e.g. the official warm-up checkpoint, or
        this trainer's weights file) become the warm-up weights."""
        model_config = self.config.model
        if official.is_checkpoint(path) and (model_config.backbone, model_config.layout) != ("resnet101", "official"):
            raise ValueError(f"warmup.weights={path} is an official ResNet-101 checkpoint: set "
                             f"model.backbone=resnet101 and model.layout=official (got {model_config.backbone}, "
                             f"{model_config.layout})")
        model = load_weights(path, lambda bn_pretrain: self.new_model(None, bn_pretrain), self.protocol.num_classes)
        try:
            self.stage_model("warmup").load_state_dict(model.state_dict())
        except RuntimeError as error:
            raise ValueError(f"warmup.weights={path} does not fit the configured model: {error}") from error
        self.log(f"warm-up: weights from {path}, no stage-0 training")
        if self.dist.is_main:
            self.stage_weights("warmup").parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), self.stage_weights("warmup"))
        self.dist.barrier()
