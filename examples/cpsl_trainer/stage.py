"""What every training stage is to the loop, and the step they share.

A stage holds its networks, optimizer and data streams, built from an explicit
:class:`~cpsl_trainer.context.RunContext`. Its losses are pure functions of a batch and the step's
:class:`~cpsl_trainer.views.Views`: :meth:`TrainingStage.source_losses` (the same for every stage)
and the stage's own :meth:`TrainingStage.target_losses`, each a dict of named terms. The shared
:meth:`TrainingStage.step` draws the views, backpropagates the source terms first (as the official
code does: that frees their graph before the target's forwards), then the target terms, and steps.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .config import OptimConfig
from .context import RunContext
from .optim import group_table
from .training import labelled_cross_entropy, no_sync, poly_lr, resize
from .views import Views


class Stage:
    """A stage as :class:`~cpsl_trainer.loop.TrainLoop` runs it: ``iterations`` calls of
    :meth:`step` after :meth:`start`; ``model`` is what it trains, evaluates and hands on, and
    ``modules`` what a checkpoint holds to resume it (each with ``state_dict``/``load_state_dict``)."""

    name: str
    iterations: int
    model: nn.Module
    modules: Dict[str, Any]

    def start(self, iteration: int) -> None:
        """Prepares the data streams from ``iteration`` on (0, or where a checkpoint stopped)."""

    def step(self, iteration: int, generator: torch.Generator) -> Dict[str, float]:
        """One iteration; ``generator`` is seeded alike on every rank. Returns the values to log."""
        raise NotImplementedError


def crop_logits(context: RunContext, net: nn.Module, images: Tensor) -> Tensor:
    """The network's logits (fp32) on crops, upsampled to the crop size."""
    with context.autocast():
        logits = resize(net(images)["out"], tuple(context.config.data.crop_size))
    return logits.float()


def weighted_sum(terms: Dict[str, Tensor], weights: Dict[str, float]) -> Tensor:
    """Σ weight · term over the ``loss_*`` entries of ``terms``, in their order (weight 1 if unnamed)."""
    return sum((weights.get(name, 1.0) * value for name, value in terms.items() if name.startswith("loss_")),
               torch.zeros(()))


class TrainingStage(Stage):
    """A stage that trains a segmentation network with the official SGD on the source labels and,
    when it has a target stream, on target terms.

    Subclasses that train on the target set ``trains_on_target`` (and ``pseudo``, the folder of
    the soft pseudo labels their target batches carry), give :meth:`make_views` and
    :meth:`target_losses`, and may add ``after_step``
    work (EMA updates, a discriminator). ``weights`` weighs the ``loss_*`` terms (1 if absent);
    other 0-dim entries of the loss dicts are logged as they are, larger ones (logits handed on to
    ``after_step``) are not.
    """

    trains_on_target = False
    pseudo: Optional[Path] = None

    def __init__(self, context: RunContext, name: str, iterations: int, model: nn.Module, optim: OptimConfig,
                 extra_params: Sequence[Dict[str, Any]] = ()) -> None:
        self.context, self.name, self.iterations, self.model, self.optim = context, name, iterations, model, optim
        self.net = context.parallel(model)
        self.optimizer = context.optimizer(model, optim, extra_params)
        section = name.rstrip("0123456789")  # distill1, distill2: the distill section
        context.log(f"{name}: parameter groups of {section}.optim (lr={optim.lr:g}, head_lr_mult={optim.head_lr_mult:g}, "
                    f"official_step={optim.official_step})\n{group_table(self.optimizer)}")
        self.scaler = context.new_scaler()
        self.modules: Dict[str, Any] = {"model": model, "optimizer": self.optimizer, "scaler": self.scaler}
        self.weights: Dict[str, float] = {}
        self.shared_parameters: List[nn.Parameter] = []  # trained on every rank alike, outside DDP
        self.source: Iterator[Dict[str, Any]] = iter(())
        self.target: Optional[Iterator[Dict[str, Any]]] = None

    def start(self, iteration: int) -> None:
        self.source = self.context.source_batches(iteration)
        self.target = self.context.target_batches(self.pseudo, iteration) if self.trains_on_target else None

    def make_views(self, source: Dict[str, Any], target: Optional[Dict[str, Any]], generator: torch.Generator) -> Views:
        return self.context.views.views(source, target, generator)

    def source_losses(self, views: Views) -> Dict[str, Tensor]:
        """The source CE on the weak source crop, and its logits (detached) for later use."""
        logits = crop_logits(self.context, self.net, views.source.images)
        return {"loss_source": labelled_cross_entropy(logits, views.source.labels),
                "source_logits": logits.detach()}

    def target_losses(self, batch: Dict[str, Any], views: Views) -> Dict[str, Tensor]:
        """The stage's terms on the target ``batch`` (its soft pseudo labels) and views."""
        return {}

    def losses(self, batch: Optional[Dict[str, Any]], views: Views) -> Dict[str, Tensor]:
        """Every term of a step, as :meth:`step` computes them (there, with a backward between)."""
        terms = self.source_losses(views)
        return {**terms, **self.target_losses(batch, views)} if batch is not None else terms

    def schedule(self, iteration: int) -> float:
        """Sets this iteration's poly learning rates; returns the base one."""
        return poly_lr(self.optimizer, self.optim.lr, iteration, self.iterations, self.optim.poly_power)

    def after_step(self, iteration: int, terms: Dict[str, Tensor]) -> Dict[str, float]:
        """Work after the optimizer's step (EMA updates, a discriminator's step); values to log."""
        return {}

    def backward(self, terms: Dict[str, Tensor]) -> None:
        self.scaler.scale(weighted_sum(terms, self.weights)).backward()

    def step(self, iteration: int, generator: torch.Generator) -> Dict[str, float]:
        lr = self.schedule(iteration)
        self.optimizer.zero_grad(set_to_none=True)
        source = next(self.source)
        target = next(self.target) if self.target is not None else None
        views = self.make_views(source, target, generator)
        # Without DDP's all-reduce when target terms follow: their backward reduces both.
        with no_sync(self.net) if target is not None else nullcontext():
            terms = self.source_losses(views)
            self.backward(terms)
        if target is not None:
            target_terms = self.target_losses(target, views)
            self.backward(target_terms)
            terms.update(target_terms)
        if self.shared_parameters:
            self.context.dist.average_gradients(self.shared_parameters)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        logged = {name: value.item() for name, value in terms.items() if value.dim() == 0}
        return {**logged, **self.after_step(iteration, terms), "lr": lr}
