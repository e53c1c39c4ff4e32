"""Stage 0: the warm-up on the source (source-only, or with the official output-space adversarial
loss), or adopting given warm-up weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import warmup_trained
from .context import RunContext
from .model import load_weights
from .stage import crop_logits, Stage, TrainingStage
from .training import poly_lr
from .views import Views


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


def adversarial_loss(discriminator: nn.Module, target_logits: Tensor) -> Tensor:
    """The network's adversarial term: its target predictions should score as source ones
    (the discriminator's parameters take no gradient from it)."""
    discriminator.requires_grad_(False)
    try:
        fooled = discriminator(target_logits.softmax(1))
    finally:
        discriminator.requires_grad_(True)
    return F.mse_loss(fooled, torch.full_like(fooled, SOURCE))


def discriminator_loss(discriminator: nn.Module, source_logits: Tensor, target_logits: Tensor) -> Tensor:
    """The discriminator's term: the sum of the source and the target mean squared errors."""
    scores = discriminator(torch.cat([source_logits, target_logits]).detach().softmax(1))
    source_scores, target_scores = scores[:len(source_logits)], scores[len(source_logits):]
    return (F.mse_loss(source_scores, torch.full_like(source_scores, SOURCE))
            + F.mse_loss(target_scores, torch.full_like(target_scores, TARGET)))


class WarmupStage(TrainingStage):
    """Stage 0: the warm-up on the source, source-only or, with ``warmup.adversarial``, the
    official ``step_adv`` (LS-GAN in output space): the network learns the source labels and to
    make its target predictions pass for source ones; the discriminator then learns to tell them
    apart."""

    def __init__(self, context: RunContext) -> None:
        config = context.config.warmup
        model = context.stage_model("warmup", context.config.model.pretrained).to(context.device).train()
        super().__init__(context, "warmup", config.iterations, model, config.optim)
        self.weights = {"loss_adv": config.adversarial_weight}
        self.discriminator: Optional[FCDiscriminator] = None
        self.trains_on_target = config.adversarial  # the target images, without pseudo labels
        if config.adversarial:
            self.discriminator = FCDiscriminator(context.protocol.num_classes).to(context.device)
            self.discriminator_net = context.parallel(self.discriminator)
            # Officially Adam(1e-4, betas (0.9, 0.99)) on the network's poly schedule (get_scheduler).
            self.discriminator_optimizer = torch.optim.Adam(
                [{"params": self.discriminator.parameters(), "lr_mult": 1.0}], lr=config.discriminator_lr,
                betas=(0.9, 0.99))
            self.modules.update(discriminator=self.discriminator, discriminator_optimizer=self.discriminator_optimizer)

    def make_views(self, source: Dict[str, Any], target: Optional[Dict[str, Any]], generator: torch.Generator) -> Views:
        return self.context.views.views(source, target, generator, strong=False)

    def target_losses(self, batch: Dict[str, Any], views: Views) -> Dict[str, Tensor]:
        assert self.discriminator is not None and views.target is not None
        target_logits = crop_logits(self.context, self.net, views.target.weak)
        return {"loss_adv": adversarial_loss(self.discriminator, target_logits), "target_logits": target_logits.detach()}

    def after_step(self, iteration: int, terms: Dict[str, Tensor]) -> Dict[str, float]:
        if self.discriminator is None:
            return {}
        config = self.context.config.warmup
        poly_lr(self.discriminator_optimizer, config.discriminator_lr, iteration, self.iterations,
                config.optim.poly_power)
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        loss = discriminator_loss(self.discriminator_net, terms["source_logits"], terms["target_logits"])
        loss.backward()
        self.discriminator_optimizer.step()
        return {"loss_D": loss.item()}


class AdoptedWarmup(Stage):
    """Stage 0 without training: ``warmup.weights`` (the official warm-up checkpoint, or a weights
    file of this trainer) become the warm-up weights."""

    def __init__(self, context: RunContext, path: Path) -> None:
        model_config = context.config.model
        loaded = load_weights(path, lambda bn_pretrain: context.new_model(None, bn_pretrain),
                              context.protocol.num_classes, (model_config.backbone, model_config.layout))
        self.name, self.iterations, self.modules = "warmup", 0, {}
        self.model = context.stage_model("warmup")
        try:
            self.model.load_state_dict(loaded.state_dict())
        except RuntimeError as error:
            raise ValueError(f"warmup.weights={path} does not fit the configured model: {error}") from error
        self.model.to(context.device)
        context.log(f"warm-up: weights from {path}, no stage-0 training")


def warmup_stage(context: RunContext) -> Stage:
    """Stage 0 as the config asks: adopted weights, or a trained warm-up."""
    config = context.config
    return WarmupStage(context) if warmup_trained(config) else AdoptedWarmup(context, Path(str(config.warmup.weights)))
