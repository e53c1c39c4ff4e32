"""Stage 0: the warm-up on the source (source-only, or with the official output-space adversarial
loss), or adopting given warm-up weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .context import RunContext
from .labels import IGNORE_INDEX
from .model import load_weights
from .training import batches, no_sync, poly_lr


class FCDiscriminator(nn.Module):
    """The official warm-up's discriminator (lslrh/CPSL ``models/discriminator.py``, after ProDA),
    under its parameter names: four 3x3 stride-2 convolutions (padding 1) over the softmax of the
    segmentation, 64, 128, 256 and 512 channels, ReLU after the first three and leaky ReLU 0.2
    after the fourth, then a 1x1 convolution to one score per location (stride 16)."""

    def __init__(self, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_classes, width, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width * 2, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(width * 2, width * 4, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(width * 4, width * 8, kernel_size=3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        self.classifier = nn.Conv2d(width * 8, 1, kernel_size=1)

    def forward(self, probabilities: Tensor) -> Tensor:
        x = self.relu(self.conv1(probabilities))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        return self.classifier(self.leaky_relu(self.conv4(x)))


# The official LS-GAN (``--gan LS``, its default; MSELoss) targets: source predictions 0, target 1.
SOURCE, TARGET = 0.0, 1.0


class WarmupStage(RunContext):
    """Stage 0: trains the warm-up on the source (with the official output-space adversarial loss
    when ``warmup.adversarial``), or adopts ``warmup.weights``."""

    def warmup(self) -> None:
        stage, stage_config = "warmup", self.config.warmup
        if stage_config.weights:
            self.adopt_warmup_weights(Path(stage_config.weights))
            return
        model = self.stage_model(stage, self.config.model.pretrained).to(self.device).train()
        net = self.parallel(model)
        optimizer = self.optimizer(model, stage_config.optim)
        scaler = self.new_scaler()
        modules: Dict[str, Any] = {"model": model, "optimizer": optimizer, "scaler": scaler}
        if stage_config.adversarial:
            discriminator = FCDiscriminator(self.protocol.num_classes).to(self.device)
            modules["discriminator"] = discriminator
            # Officially Adam(1e-4, betas (0.9, 0.99)) on the network's poly schedule (get_scheduler).
            modules["discriminator_optimizer"] = torch.optim.Adam(
                [{"params": discriminator.parameters(), "lr_mult": 1.0}], lr=stage_config.discriminator_lr,
                betas=(0.9, 0.99))
        start = self.resume_modules(stage, modules)
        source = self.source_batches(start)
        if stage_config.adversarial:
            target = batches(self.target_train, self.config, self.config.train.seed + 1, start, self.dist)
            adversarial_step = self.adversarial_step(net, modules, source, target, scaler)

        def step(iteration: int, generator: torch.Generator) -> Dict[str, float]:
            lr = poly_lr(optimizer, stage_config.optim.lr, iteration, stage_config.iterations, stage_config.optim.poly_power)
            if stage_config.adversarial:
                poly_lr(modules["discriminator_optimizer"], stage_config.discriminator_lr, iteration,
                        stage_config.iterations, stage_config.optim.poly_power)
                return {**adversarial_step(generator), "lr": lr}
            loss = self.source_loss(net, next(source), generator)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            return {"loss_source": loss.item(), "lr": lr}

        self.train_loop(stage, start, stage_config.iterations, modules, step, model)

    def adversarial_step(self, net: nn.Module, modules: Dict[str, Any], source: Iterator, target: Iterator,
                         scaler: torch.amp.GradScaler) -> Callable[[torch.Generator], Dict[str, float]]:
        """One iteration of the official warm-up (``step_adv``; LS-GAN in output space): the
        segmentation network learns the source labels and to make its target predictions pass for
        source ones; the discriminator then learns to tell them apart, its loss the sum of the
        source and the target mean squared errors."""
        optimizer, discriminator = modules["optimizer"], modules["discriminator"]
        discriminator_optimizer = modules["discriminator_optimizer"]
        discriminator_net = self.parallel(discriminator)
        weight = self.config.warmup.adversarial_weight

        def step(generator: torch.Generator) -> Dict[str, float]:
            optimizer.zero_grad(set_to_none=True)
            with no_sync(net):
                source_logits, labels = self.crop_logits(net, next(source), generator)
                loss_source = F.cross_entropy(source_logits, labels, ignore_index=IGNORE_INDEX)
                scaler.scale(loss_source).backward()
            target_logits, _ = self.crop_logits(net, next(target), generator)
            discriminator.requires_grad_(False)
            fooled = discriminator(target_logits.softmax(1))
            loss_adversarial = F.mse_loss(fooled, torch.full_like(fooled, SOURCE))
            scaler.scale(weight * loss_adversarial).backward()
            scaler.step(optimizer)
            scaler.update()
            discriminator.requires_grad_(True)
            discriminator_optimizer.zero_grad(set_to_none=True)
            scores = discriminator_net(torch.cat([source_logits, target_logits]).detach().softmax(1))
            source_scores, target_scores = scores[:len(source_logits)], scores[len(source_logits):]
            loss_discriminator = (F.mse_loss(source_scores, torch.full_like(source_scores, SOURCE))
                                  + F.mse_loss(target_scores, torch.full_like(target_scores, TARGET)))
            loss_discriminator.backward()
            discriminator_optimizer.step()
            return {"loss_source": loss_source.item(), "loss_adv": loss_adversarial.item(),
                    "loss_D": loss_discriminator.item()}

        return step

    def adopt_warmup_weights(self, path: Path) -> None:
        """Stage 0 without training: ``warmup.weights`` (e.g. the official warm-up checkpoint, or
        this trainer's weights file) become the warm-up weights."""
        model_config = self.config.model
        model = load_weights(path, lambda bn_pretrain: self.new_model(None, bn_pretrain), self.protocol.num_classes,
                             (model_config.backbone, model_config.layout))
        try:
            self.stage_model("warmup").load_state_dict(model.state_dict())
        except RuntimeError as error:
            raise ValueError(f"warmup.weights={path} does not fit the configured model: {error}") from error
        self.log(f"warm-up: weights from {path}, no stage-0 training")
        if self.dist.is_main:
            self.stage_weights("warmup").parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), self.stage_weights("warmup"))
        self.dist.barrier()
