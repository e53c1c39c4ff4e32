"""The shared context of the training stages: config, data, models, logging and the loop every
stage runs (seeded iterations, logs, in-stage evaluations, checkpoints from checkpoints.py)."""

from __future__ import annotations

import json
import platform
import time
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

import cpsl_ops

from .augment import CropBoxes, crop, StrongAugment
from .checkpoints import Checkpoints
from .colour import WithColourTransfer
from .config import AMP_DTYPES, Config, OptimConfig
from .config_check import check_config
from .data import CityscapesDataset, GTA5Dataset, SynthiaDataset
from .distributed import Distributed, synchronize_batch_norm
from .labels import IGNORE_INDEX
from .model import DeepLabV2
from .optim import make_optimizer, RepeatedSGD
from .randaugment import strong_view, StrongRecipe
from .training import (
    as_float_images, batches, choose_device, iteration_seed, no_sync, parse_stop_after, peak_memory_mb, protocol_of,
    resize, StopRequested, WithSoftLabels)


class RunContext(Checkpoints):
    """What the stages share: the config, data, models, checkpoints, logging and the training
    loop. Evaluation is the Evaluation stage's (evaluation.py)."""

    def __init__(
        self, config: Config, stop_after: Optional[Tuple[str, int]] = None, context: Optional[Distributed] = None,
        training: bool = True,
    ) -> None:
        self.config = config = check_config(config, training)
        self.stop_after = stop_after or parse_stop_after(config.train.stop_after)
        self.dist = context or Distributed()
        self.output = Path(config.train.output_dir)
        self.output.mkdir(parents=True, exist_ok=True)
        self.device = choose_device(config.train.device, self.dist.local_rank)
        self.protocol = protocol_of(config.data.protocol)
        self.dist.share(config.data.batch_size)  # an uneven share fails here, not at the first batch
        self.state: Dict[str, Any] = {"completed": [], "metrics": {}, "best": {}}
        self.resumed_modules: Dict[str, Any] = {}
        self.writer = None
        if config.train.tensorboard and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output / "tensorboard"))
        self.target_val = CityscapesDataset(config.data.target_root, "val", classes=self.protocol.classes_argument)

    # -- setup

    @cached_property
    def target_train(self) -> Dataset:
        data = self.config.data
        return CityscapesDataset(data.target_root, "train", size=tuple(data.target_size),
                                 classes=self.protocol.classes_argument, with_labels=False)

    @cached_property
    def source(self) -> Dataset:
        data = self.config.data
        size = tuple(data.source_size)
        if data.source == "synthia":
            return SynthiaDataset(data.source_root, size=size, classes=self.protocol.classes_argument)
        source = GTA5Dataset(data.source_root, size=size, classes=self.protocol.classes_argument)
        return WithColourTransfer(source, self.target_train, self.config.train.seed) if data.colour_transfer else source

    def new_model(self, pretrained: Optional[str] = None, bn_pretrain: bool = False) -> DeepLabV2:
        return DeepLabV2.from_config(self.config.model, self.protocol.num_classes, pretrained, bn_pretrain)

    def stage_model(self, stage: str, pretrained: Optional[str] = None) -> DeepLabV2:
        """A new network of ``stage``: the distillation students carry ``bn_pretrain`` if asked."""
        return self.new_model(pretrained, stage.startswith("distill") and self.config.distill.bn_pretrain)

    def parallel(self, model: nn.Module) -> nn.Module:
        """Under torchrun: BatchNorm over the global batch and a DDP wrapper; else ``model`` itself."""
        if self.dist.group is None:
            return model
        model = synchronize_batch_norm(model, self.dist, self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=self.dist.group)

    def crop_boxes(self, generator: torch.Generator, batch: int, image_size: Sequence[int]) -> CropBoxes:
        """Crops drawn for the global batch, this rank's rows: the same crops at any world size."""
        data = self.config.data
        base_scale = 1.0 if data.scale_long_side is None else data.scale_long_side / max(image_size)
        boxes = CropBoxes.sample(generator, batch * self.dist.world_size, image_size, data.crop_size, data.scale_range,
                                 base_scale)
        return boxes[self.dist.rows(batch)]

    def strong_view(self, generator: torch.Generator, images: Tensor) -> Tuple[Tensor, StrongAugment]:
        """RandAugmentMC views of this rank's ``images``, drawn for the global batch like the crops."""
        data = self.config.data
        recipes = [StrongRecipe.sample(generator, data.strong_ops, data.strong_magnitude, data.strong_jitter)
                   for _ in range(images.shape[0] * self.dist.world_size)]
        return strong_view(images, recipes[self.dist.rows(images.shape[0])])

    def log(self, text: str) -> None:
        if self.dist.is_main:
            tqdm.write(text)

    def autocast(self):
        amp = self.config.train.amp
        if amp == "none":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[amp])

    def describe(self) -> str:
        environment = {
            "python": platform.python_version(), "torch": torch.__version__, "cpsl_ops": cpsl_ops.__version__,
            "cpsl_ops build": cpsl_ops.build_info(), "device": str(self.device), "threads": torch.get_num_threads(),
            "world size": self.dist.world_size,
            "source images": len(self.source), "target train images": len(self.target_train),
            "target val images": len(self.target_val),
        }
        return "config:\n" + self.config.to_yaml() + "environment:\n" + "\n".join(f"  {k}: {v}" for k, v in environment.items())

    # -- the loop shared by the training stages

    def train_loop(
        self,
        stage: str,
        start: int,
        total: int,
        modules: Dict[str, Any],
        step: Callable[[int, torch.Generator], Dict[str, float]],
        evaluate_model: nn.Module,
    ) -> None:
        """Runs ``step`` for iterations start..total-1 with per-iteration seeds, logging (the
        mean over ranks, also appended to ``log.jsonl``), evaluations and checkpoints; saves the
        final weights of ``evaluate_model``.

        ``step`` gets a generator seeded alike on every rank, for what is drawn for the global batch
        (crops, strong views, CutMix, pixel draws); torch's global generator, for dropout, is
        seeded per rank."""
        train, rank = self.config.train, self.dist.rank
        bar = tqdm(range(start, total), desc=stage, initial=start, total=total,
                   disable=not (train.progress and self.dist.is_main), dynamic_ncols=True)
        tick, recent = time.perf_counter(), []
        for iteration in bar:
            torch.manual_seed(iteration_seed(train.seed, stage, iteration, rank))
            shared = torch.Generator().manual_seed(iteration_seed(train.seed + 1, stage, iteration))
            recent.append(step(iteration, shared))
            done = iteration + 1
            if done % train.log_every == 0 or done == total:
                seconds = (time.perf_counter() - tick) / len(recent)
                means = self.dist.mean({k: sum(r[k] for r in recent) / len(recent) for k in recent[0]})
                text = " ".join(f"{k}={v:.4f}" for k, v in means.items())
                self.log(f"[{stage} {done}/{total}] {text} {seconds:.2f}s/it peak_mem={peak_memory_mb(self.device):.0f}MB")
                if self.dist.is_main:
                    with open(self.output / "log.jsonl", "a") as log:
                        log.write(json.dumps({"stage": stage, "iteration": done, **means, "s_per_it": seconds}) + "\n")
                if self.writer is not None:
                    for key, value in means.items():
                        self.writer.add_scalar(f"{stage}/{key}", value, done)
                tick, recent = time.perf_counter(), []
            if self.config.eval.every and done % self.config.eval.every == 0 and done < total:
                if self.dist.is_main:
                    result = self.evaluate(evaluate_model, f"{stage}-{done}", save_images=False, step=(stage, done))
                    self.keep_if_best(stage, done, result, evaluate_model.state_dict())
                self.dist.barrier()
            if done % train.checkpoint_every == 0 or done == total or self.stop_after == (stage, done):
                self.save_checkpoint(stage, done, modules)
            if self.stop_after == (stage, done) and done < total:
                raise StopRequested(f"stopped after {stage} iteration {done}")
        bar.close()
        if self.dist.is_main:
            torch.save(evaluate_model.state_dict(), self.stage_weights(stage))
        self.dist.barrier()

    def weak_crop(self, batch: Dict[str, Any], generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        """A weakly augmented crop of each image (float in [0, 1]) and the crop's labels (empty for
        unlabelled images)."""
        data = self.config.data
        images = as_float_images(batch["image"], self.device)
        boxes = self.crop_boxes(generator, images.shape[0], images.shape[-2:])
        crops = crop(images, boxes, data.crop_size)
        labels = batch["label"].to(self.device).long()
        labels = crop(labels[:, None], boxes, data.crop_size)[:, 0] if labels.dim() == 3 else labels
        return crops, labels

    def crop_logits(self, model: nn.Module, batch: Dict[str, Any], generator: torch.Generator,
                    cut: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        """The model's logits (fp32, at crop size) on a weakly augmented crop of each image (``cut``,
        the (crops, labels) of :meth:`weak_crop`, if the caller cut it), and the crop's labels."""
        crops, labels = cut if cut is not None else self.weak_crop(batch, generator)
        with self.autocast():
            logits = resize(model(crops)["out"], tuple(self.config.data.crop_size))
        return logits.float(), labels

    def source_loss(self, model: nn.Module, batch: Dict[str, Any], generator: torch.Generator,
                    cut: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """CE of the model on a weakly augmented source crop (``cut``, if the caller cut it)."""
        logits, labels = self.crop_logits(model, batch, generator, cut)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)

    def source_backward(self, net: nn.Module, batch: Dict[str, Any], generator: torch.Generator,
                        scaler: torch.amp.GradScaler, cut: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """The source loss, backpropagated first (as the official code does: that frees its graph)
        and without DDP's all-reduce, which the target loss's backward then does for both."""
        with no_sync(net):
            loss = self.source_loss(net, batch, generator, cut)
            scaler.scale(loss).backward()
        return loss

    def new_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, active only under fp16 autocast (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.config.train.amp == "fp16")

    def source_batches(self, start: int) -> Iterator[Dict[str, Any]]:
        """Source training batches from batch ``start`` on (the same order after a resume)."""
        return batches(self.source, self.config, self.config.train.seed, start, self.dist)

    def target_batches(self, pseudo: Path, start: int) -> Iterator[Dict[str, Any]]:
        """Target training batches with the soft pseudo labels stored under ``pseudo``."""
        return batches(WithSoftLabels(self.target_train, pseudo), self.config, self.config.train.seed + 1, start, self.dist)

    def adaptation_batches(self, stage: str, modules: Dict[str, Any], pseudo: Path) -> Tuple[int, Iterator, Iterator]:
        """Resumes ``modules`` for ``stage``: (first iteration, source batches, target batches from there)."""
        start = self.resume_modules(stage, modules)
        return start, self.source_batches(start), self.target_batches(pseudo, start)

    @property
    def quarter_crop(self) -> Tuple[int, int]:
        """The crop at output stride 4, where the target losses are taken (as officially)."""
        crop_size = self.config.data.crop_size
        return crop_size[0] // 4, crop_size[1] // 4

    def optimizer(self, model: DeepLabV2, optim_config: OptimConfig, extra: Sequence[Dict[str, Any]] = ()) -> RepeatedSGD:
        return make_optimizer(model, optim_config.lr, optim_config.head_lr_mult, extra, optim_config.momentum,
                              optim_config.weight_decay, optim_config.official_step)

    def evaluate(self, model: nn.Module, name: str, save_images: bool = True,
                 step: Optional[Tuple[str, int]] = None) -> Dict[str, Any]:
        raise NotImplementedError  # evaluation.Evaluation
