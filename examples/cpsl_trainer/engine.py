"""The training pipeline: warm-up, pseudo labels, CPSL self-labeling, distillation, evaluation.

Every stage is a loop of iterations whose randomness (data order, augmentation, dropout, pixel
sampling) is a function of the seed, the stage, the iteration number and the rank, so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.

Under torchrun each rank trains a DistributedDataParallel replica on its slice of every global
batch (``data.batch_size`` images per rank); the data order and the crops are drawn for the
global batch, so they do not depend on the number of ranks. Rank 0 alone writes pseudo labels,
evaluates, logs and writes checkpoints.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import cpsl_ops
from cpsl_ops import SelfLabelingLoss, class_distribution, prototype_similarity, rectify_pseudo_labels

from .augment import CropBoxes, box_mask, crop, cutmix_box, strong_view
from .colour import WithColourTransfer
from .config import Config, config_from_dict
from .data import CityscapesDataset, GTA5Dataset, SynthiaDataset, write_rgb
from .distributed import Distributed, synchronize_batch_norm
from .files import OutputLock, keep_log_lines, load_torch_file
from .labels import CITYSCAPES_CLASSES, IGNORE_INDEX, SYNTHIA_13_TRAIN_IDS, SYNTHIA_16_TRAIN_IDS, colorize
from .metrics import ConfusionMatrix, iou_table
from . import official
from .model import DeepLabV2, load_weights, parameter_groups

RCE_LOG_CLAMP = -math.log(1e-4)  # the reverse CE's log of a clamped one-hot label


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Protocol:
    """Which Cityscapes train ids the model predicts, and which subsets the report averages."""

    kept_train_ids: List[int]
    extra_subsets: Dict[str, List[int]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.kept_train_ids)

    @property
    def class_names(self) -> List[str]:
        return [CITYSCAPES_CLASSES[t] for t in self.kept_train_ids]

    @property
    def classes_argument(self) -> Optional[List[int]]:
        return None if self.num_classes == 19 else self.kept_train_ids


def protocol_of(name: str) -> Protocol:
    if name == "cityscapes19":
        return Protocol(list(range(19)))
    if name == "synthia16":
        positions = [SYNTHIA_16_TRAIN_IDS.index(t) for t in SYNTHIA_13_TRAIN_IDS]
        return Protocol(SYNTHIA_16_TRAIN_IDS, {"mIoU-13": positions})
    raise ValueError(f"data.protocol must be cityscapes19 or synthia16, got {name!r}")


class EpochBatches(Sampler):
    """An endless stream of batches: a fresh seeded permutation per epoch, starting at any batch.

    Global batches hold ``batch_size * world_size`` indices; rank r gets the r-th slice of each.
    With ``epoch_tags`` an index comes as ``index + size * epoch``, for datasets that draw
    something per occurrence of a sample (:class:`colour.WithColourTransfer`).
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world_size: int = 1,
        epoch_tags: bool = False,
    ) -> None:
        self.size, self.batch_size, self.seed, self.start_batch = size, batch_size, seed, start_batch
        self.rank, self.world_size, self.epoch_tags = rank, world_size, epoch_tags

    def __iter__(self) -> Iterator[List[int]]:
        global_batch = self.batch_size * self.world_size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        epoch, offset = divmod(self.start_batch * global_batch, self.size)
        batch: List[int] = []
        while True:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            for index in order[offset:].tolist():
                batch.append(index + self.size * epoch if self.epoch_tags else index)
                if len(batch) == global_batch:
                    yield batch[mine]
                    batch = []
            epoch, offset = epoch + 1, 0


def soft_label_file(directory: Path, name: str) -> Path:
    """Where the soft pseudo label of the image ``name`` (its path under the dataset root) is stored."""
    return directory / (name.rsplit(".", 1)[0].replace("/", "__") + ".npy")


def weights_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter and buffer, naming the weights that made a set of pseudo labels."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class WithSoftLabels(Dataset):
    """Adds the stored soft pseudo label (K, h, w) of each image as ``sample["soft"]``."""

    def __init__(self, dataset: Dataset, directory: Path) -> None:
        self.dataset, self.directory = dataset, Path(directory)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        sample = dict(self.dataset[index])
        sample["soft"] = torch.from_numpy(np.load(soft_label_file(self.directory, sample["name"])))
        return sample


def batches(dataset: Dataset, config: Config, seed: int, start_batch: int, context: Distributed) -> Iterator[Dict[str, Any]]:
    sampler = EpochBatches(len(dataset), config.data.batch_size, seed, start_batch, context.rank, context.world_size,
                           epoch_tags=isinstance(dataset, WithColourTransfer))
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=config.data.num_workers))


# ----------------------------------------------------------------------------- helpers


def as_float_images(images: Tensor, device: torch.device) -> Tensor:
    """uint8 (B, 3, H, W) → float in [0, 1] (the official preprocessing: x/255, no mean/std)."""
    return images.to(device, non_blocking=True).float().div_(255)


def resize(maps: Tensor, size: Tuple[int, int]) -> Tensor:
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def reverse_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """The official RCE: mean over valid pixels of −Σ_k p_k log clamp(onehot_k, 1e-4, 1)."""
    probabilities = logits.float().softmax(1).clamp(1e-7, 1.0)
    valid = labels != IGNORE_INDEX
    picked = probabilities.gather(1, labels.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
    per_pixel = RCE_LOG_CLAMP * (probabilities.sum(1) - picked)
    return per_pixel[valid].mean() if valid.any() else per_pixel.sum() * 0


SELECTION_NOTES = {
    "best": "each stage's best evaluation on the target val set (every eval.every iterations and at its end), "
            "as the paper and the official code select; the last weights' mIoU is stages.<stage>.selection.last_mIoU",
    "last": "each stage's last weights; its best evaluation is stages.<stage>.selection.best_mIoU",
}


def distillation_kl(student_logits: Tensor, teacher_probabilities: Tensor, form: str) -> Tensor:
    """The distillation term: ``official`` is the official code's ``F.kl_div`` given the student's
    probabilities where it expects log-probabilities, averaged over every (class, pixel) entry,
    i.e. mean of t (log t - p_s); ``proper`` is KL(p_t || p_s), summed over classes and averaged
    over pixels."""
    if form == "official":
        return F.kl_div(student_logits.softmax(1), teacher_probabilities, reduction="mean")
    if form == "proper":
        return F.kl_div(student_logits.log_softmax(1), teacher_probabilities, reduction="none").sum(1).mean()
    raise ValueError(f"distill.kl must be official or proper, got {form!r}")


def iteration_seed(seed: int, stage: str, iteration: int, rank: int = 0) -> int:
    """A distinct, reproducible seed for every (stage, iteration, rank)."""
    return (seed * 1_000_003 + sum(map(ord, stage)) * 7_919 + iteration + rank * 2**40) % (2**63)


def poly_lr(optimizer: torch.optim.Optimizer, base_lr: float, iteration: int, total: int, power: float) -> float:
    factor = max(1.0 - iteration / max(total, 1), 0.0) ** power
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group["lr_mult"] * factor
    return base_lr * factor


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← m·teacher + (1 − m)·student for parameters; buffers (BN statistics) copied."""
    for ema_param, param in zip(teacher.parameters(), student.parameters()):
        ema_param.lerp_(param.detach(), 1.0 - momentum)
    for ema_buffer, buffer in zip(teacher.buffers(), student.buffers()):
        ema_buffer.copy_(buffer)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def colour_png(path: Path, labels: Tensor, protocol: Protocol) -> None:
    """Writes (H, W) class indices of ``protocol`` as a Cityscapes-palette colour PNG."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    table[: protocol.num_classes] = protocol.kept_train_ids
    write_rgb(path, colorize(table[labels.cpu().numpy().astype(np.uint8)]))


# ----------------------------------------------------------------------------- the run


class StopRequested(Exception):
    """Raised after the checkpoint at ``stop_after`` is written (simulates a killed job)."""


# Modules whose state differs between ranks (the memory-bank queues): checkpointed per rank.
PER_RANK_MODULES = ("self_labeling",)


@dataclass(frozen=True)
class Draws:
    """The random generators of one iteration. ``shared`` is seeded alike on every rank (crops of
    the global batch, CutMix); ``local`` differs per rank (strong views) and is ``shared`` itself
    in a single-process run."""

    shared: torch.Generator
    local: torch.Generator


def choose_device(wanted: str, local_rank: int = 0) -> torch.device:
    """``train.device`` (auto | cpu | cuda) as a device; each torchrun rank gets its own GPU."""
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(wanted)
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def parse_stop_after(text: Optional[str]) -> Optional[Tuple[str, int]]:
    """``train.stop_after`` ("stage:iteration") as a (stage, iteration) pair."""
    if text is None:
        return None
    stage, _, iteration = str(text).partition(":")
    if not iteration.isdigit():
        raise ValueError(f"train.stop_after must look like 'cpsl:500', got {text!r}")
    return stage, int(iteration)


def no_sync(model: nn.Module):
    """Accumulate this backward locally; DDP averages the sum at the iteration's last backward."""
    return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else nullcontext()


class Pipeline:
    """One training run: builds the data and models and runs the stages, resuming where asked."""

    def __init__(
        self, config: Config, stop_after: Optional[Tuple[str, int]] = None, context: Optional[Distributed] = None
    ) -> None:
        self.config = config
        self.stop_after = stop_after or parse_stop_after(config.train.stop_after)
        self.dist = context or Distributed()
        self.output = Path(config.train.output_dir)
        self.output.mkdir(parents=True, exist_ok=True)
        self.device = choose_device(config.train.device, self.dist.local_rank)
        self.protocol = protocol_of(config.data.protocol)
        if config.eval.select not in SELECTION_NOTES:
            raise ValueError(f"eval.select must be one of {sorted(SELECTION_NOTES)}, got {config.eval.select!r}")
        self.state: Dict[str, Any] = {"completed": [], "metrics": {}, "best": {}}
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
        if data.source == "gta5":
            source = GTA5Dataset(data.source_root, size=size, classes=self.protocol.classes_argument)
            return WithColourTransfer(source, self.target_train, self.config.train.seed) if data.colour_transfer else source
        if data.source == "synthia":
            return SynthiaDataset(data.source_root, size=size, classes=self.protocol.classes_argument)
        raise ValueError(f"data.source must be gta5 or synthia, got {data.source!r}")

    def new_model(self, pretrained: Optional[str] = None, bn_pretrain: bool = False) -> DeepLabV2:
        model = self.config.model
        return DeepLabV2(model.backbone, self.protocol.num_classes, model.feat_dim, tuple(model.dilations), pretrained,
                         model.dropout, model.layout, bn_pretrain)

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
        return boxes[self.dist.rank * batch:(self.dist.rank + 1) * batch]

    def log(self, text: str) -> None:
        if self.dist.is_main:
            tqdm.write(text)

    def autocast(self):
        amp = self.config.train.amp
        if amp == "none":
            return nullcontext()
        return torch.autocast(self.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])

    def describe(self) -> str:
        environment = {
            "python": platform.python_version(), "torch": torch.__version__, "cpsl_ops": cpsl_ops.__version__,
            "cpsl_ops build": cpsl_ops.build_info(), "device": str(self.device), "threads": torch.get_num_threads(),
            "world size": self.dist.world_size,
            "source images": len(self.source), "target train images": len(self.target_train),
            "target val images": len(self.target_val),
        }
        return "config:\n" + self.config.to_yaml() + "environment:\n" + "\n".join(f"  {k}: {v}" for k, v in environment.items())

    # -- checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.output / "checkpoints" / "last.pt"

    def save_checkpoint(self, stage: str, iteration: int, modules: Dict[str, Any]) -> None:
        """Rank 0 writes one file; the per-rank states are gathered into it (a collective)."""
        per_rank = {name: {key: value.cpu() for key, value in module.state_dict().items()}
                    for name, module in modules.items() if name in PER_RANK_MODULES}
        rank_modules = self.dist.gather_to_main(per_rank)
        if not self.dist.is_main:
            return
        payload = {"config": self.config.to_dict(), "stage": stage, "iteration": iteration,
                   "completed": self.state["completed"], "metrics": self.state["metrics"], "best": self.state["best"],
                   "world_size": self.dist.world_size, "rank_modules": rank_modules,
                   "modules": {name: module.state_dict() for name, module in modules.items()
                               if name not in PER_RANK_MODULES}}
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.checkpoint_path.with_suffix(".tmp")
        torch.save(payload, partial)
        os.replace(partial, self.checkpoint_path)  # a job killed while saving leaves the last good one

    def load_checkpoint(self, path: Path) -> None:
        payload = load_torch_file(path, weights_only=False)
        def comparable(config: Config) -> Dict[str, Any]:
            values = config.to_dict()
            values["train"].pop("output_dir")  # a run directory may be moved
            values["train"].pop("stop_after")  # the very option that interrupted the run
            return values

        if comparable(config_from_dict(payload["config"])) != comparable(self.config):
            raise ValueError(f"{path} was written with another config; resume with the same config file and overrides")
        if payload["world_size"] != self.dist.world_size:
            raise ValueError(f"{path} was written by {payload['world_size']} processes; resume with as many "
                             f"(torchrun --nproc-per-node={payload['world_size']}), not {self.dist.world_size}")
        self.state = {"best": {}, **payload}  # checkpoints written before model selection lack "best"
        if self.dist.is_main:  # the resumed run logs again what came after the checkpoint
            completed, stage, iteration = set(payload["completed"]), payload["stage"], payload["iteration"]
            keep_log_lines(self.output / "log.jsonl", lambda entry: entry["stage"] in completed or (
                entry["stage"] == stage and entry["iteration"] <= iteration))

    def resume_modules(self, stage: str, modules: Dict[str, Any]) -> int:
        """Restores ``modules`` if the checkpoint stopped inside ``stage``; returns the start iteration."""
        if self.state.get("stage") != stage or stage in self.state["completed"]:
            return 0
        for name, module in modules.items():
            if name in PER_RANK_MODULES:
                module.load_state_dict(self.state["rank_modules"][self.dist.rank][name])
            else:
                module.load_state_dict(self.state["modules"][name])
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

    # -- the loop shared by the training stages

    def train_loop(
        self,
        stage: str,
        start: int,
        total: int,
        modules: Dict[str, Any],
        step: Callable[[int, Draws], Dict[str, float]],
        evaluate_model: nn.Module,
    ) -> None:
        """Runs ``step`` for iterations start..total-1 with per-iteration seeds, logging (the
        mean over ranks, also appended to ``log.jsonl``), evaluations and checkpoints; saves the
        final weights of ``evaluate_model``."""
        train, rank = self.config.train, self.dist.rank
        bar = tqdm(range(start, total), desc=stage, initial=start, total=total,
                   disable=not (train.progress and self.dist.is_main), dynamic_ncols=True)
        tick, recent = time.perf_counter(), []
        for iteration in bar:
            torch.manual_seed(iteration_seed(train.seed, stage, iteration, rank))
            shared = torch.Generator().manual_seed(iteration_seed(train.seed + 1, stage, iteration))
            local = shared if self.dist.group is None else \
                torch.Generator().manual_seed(iteration_seed(train.seed + 2, stage, iteration, rank))
            recent.append(step(iteration, Draws(shared, local)))
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

    def source_loss(self, model: nn.Module, batch: Dict[str, Any], generator: torch.Generator) -> Tensor:
        """CE of the model on a weakly augmented source crop."""
        data = self.config.data
        images = as_float_images(batch["image"], self.device)
        boxes = self.crop_boxes(generator, images.shape[0], images.shape[-2:])
        crops = crop(images, boxes, data.crop_size)
        labels = crop(batch["label"].to(self.device).long()[:, None], boxes, data.crop_size)[:, 0]
        with self.autocast():
            logits = resize(model(crops)["out"], tuple(data.crop_size))
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)

    def source_backward(self, net: nn.Module, batch: Dict[str, Any], generator: torch.Generator,
                        scaler: torch.amp.GradScaler) -> Tensor:
        """The source loss, backpropagated first (as the official code does: that frees its graph)
        and without DDP's all-reduce, which the target loss's backward then does for both."""
        with no_sync(net):
            loss = self.source_loss(net, batch, generator)
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

    def optimizer(self, model: nn.Module, optim_config: Any, extra: List[Dict[str, Any]] = ()) -> torch.optim.SGD:
        groups = parameter_groups(model, optim_config.lr, optim_config.head_lr_mult) + list(extra)
        return torch.optim.SGD(groups, lr=optim_config.lr, momentum=optim_config.momentum,
                               weight_decay=optim_config.weight_decay)

    # -- stage 0: source-only warm-up

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

    # -- pseudo labels of a trained model on the target train set

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Tensor, flip: bool) -> Dict[str, Tensor]:
        with self.autocast():
            out = model(images)
            probabilities = out["out"].float().softmax(1)
            if flip:
                flipped = model(images.flip(-1))["out"].float().softmax(1).flip(-1)
                probabilities = (probabilities + flipped) / 2
        return {"probabilities": probabilities, "feat": out["feat"].float()}

    def pseudo_dir(self, name: str) -> Path:
        return self.output / "pseudo" / name

    def pseudo_labels(self, model: nn.Module, name: str, flip: bool, with_prototypes: bool) -> Path:
        """Rank 0 writes them (:meth:`generate_pseudo_labels`) while the other ranks wait."""
        if self.dist.is_main:
            self.generate_pseudo_labels(model, name, flip, with_prototypes)
        self.dist.barrier()
        return self.pseudo_dir(name)

    @torch.no_grad()
    def generate_pseudo_labels(self, model: nn.Module, name: str, flip: bool, with_prototypes: bool) -> Path:
        """Soft labels (K, h, w) fp16 of every target train image at stride 8, the class prior of
        the argmax predictions and, for stage 1, the prototype initialization (class means). They
        are reused only if made by the same weights, options and images (``summary.pt``'s key)."""
        directory = self.pseudo_dir(name)
        key = {"weights": weights_fingerprint(model), "flip": flip, "with_prototypes": with_prototypes,
               "images": [pair[0].relative_to(self.target_train.root).as_posix() for pair in self.target_train.pairs],
               "size": list(self.config.data.target_size)}
        if (directory / "summary.pt").exists() and load_torch_file(directory / "summary.pt").get("key") == key:
            return directory
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        model.eval()
        classes, feat_dim = self.protocol.num_classes, self.config.model.feat_dim
        counts = torch.zeros(classes, dtype=torch.float64)
        prototypes = torch.zeros(classes, feat_dim, dtype=torch.float64)
        prototype_images = torch.zeros(classes, dtype=torch.long)
        image_means = torch.zeros(classes, feat_dim, device=self.device)
        loader = DataLoader(self.target_train, batch_size=self.config.data.batch_size, num_workers=self.config.data.num_workers)
        index = 0
        for batch in tqdm(loader, desc=f"pseudo labels ({name})", disable=not self.config.train.progress, leave=False):
            out = self.predict(model, as_float_images(batch["image"], self.device), flip)
            predictions = out["probabilities"].argmax(1)
            counts += class_distribution(predictions, classes).double() * predictions.numel()
            for soft, feat, labels, image_name in zip(out["probabilities"], out["feat"], predictions, batch["name"]):
                np.save(soft_label_file(directory, image_name), soft.half().cpu().numpy())
                if index < self.config.eval.save_images:
                    colour_png(self.output / "pseudo_labels" / name / f"{index:06d}.png", labels, self.protocol)
                index += 1
                if not with_prototypes:
                    continue
                # Class means of this image (momentum 0 replaces the buffer), then a running
                # mean over images capped at 3000, as the official calc_prototype.py does.
                image_means.zero_()
                pixels = cpsl_ops.update_prototypes_(image_means, feat[None], labels[None], momentum=0.0)
                present = (pixels.cpu() >= self.config.cpsl.prototype_min_pixels)
                seen = prototype_images[present].double()[:, None]
                prototypes[present] = (prototypes[present] * seen + image_means.cpu()[present].double()) / (seen + 1)
                prototype_images[present] = (prototype_images[present] + 1).clamp(max=3000)
        if with_prototypes and (prototype_images == 0).any():
            missing = [self.protocol.class_names[k] for k in (prototype_images == 0).nonzero().flatten().tolist()]
            tqdm.write(f"note: no target image predicts {missing}; their prototypes start random")
            prototypes[prototype_images == 0] = torch.randn(int((prototype_images == 0).sum()), feat_dim).double()
        prior = (counts / counts.sum()).float().clamp_min(1e-6)
        torch.save({"prior": prior / prior.sum(), "prototypes": prototypes.float(), "key": key}, directory / "summary.pt")
        return directory

    # -- stage 1: CPSL

    def cpsl(self) -> None:
        stage, cfg, data = "cpsl", self.config.cpsl, self.config.data
        warm = self.stage_model("warmup")
        warm.load_state_dict(load_torch_file(self.selected_weights("warmup")))
        warm.to(self.device)
        pseudo = self.pseudo_labels(warm, "warmup", flip=False, with_prototypes=True)
        summary = load_torch_file(pseudo / "summary.pt")
        student = warm.train()
        teacher = copy.deepcopy(student)  # the official EMA network stays in training mode
        for param in teacher.parameters():
            param.requires_grad_(False)
        teacher = synchronize_batch_norm(teacher, self.dist, self.device)
        net = self.parallel(student)
        loss_sl = SelfLabelingLoss(
            self.protocol.num_classes, self.config.model.feat_dim, summary["prior"], cfg.temperature, cfg.epsilon,
            cfg.sinkhorn_iters, cfg.queue_size, cfg.samples_per_image, cfg.ema_momentum, IGNORE_INDEX,
            process_group=self.dist.group,
        ).to(self.device)
        loss_sl.init_prototypes(summary["prototypes"])
        optimizer = self.optimizer(student, cfg.optim, [{"params": [loss_sl.prototypes], "lr_mult": cfg.prototype_lr_mult}])
        scaler = self.new_scaler()
        modules = {"model": student, "teacher": teacher, "self_labeling": loss_sl, "optimizer": optimizer, "scaler": scaler}
        start = self.resume_modules(stage, modules)
        source = self.source_batches(start)
        target = self.target_batches(pseudo, start)
        quarter = (data.crop_size[0] // 4, data.crop_size[1] // 4)

        def step(iteration: int, draws: Draws) -> Dict[str, float]:
            lr = poly_lr(optimizer, cfg.optim.lr, iteration, cfg.iterations, cfg.optim.poly_power)
            optimizer.zero_grad(set_to_none=True)
            source_batch = next(source)
            loss_source = self.source_backward(net, source_batch, draws.shared, scaler)

            batch = next(target)
            full = as_float_images(batch["image"], self.device)
            boxes = self.crop_boxes(draws.shared, full.shape[0], full.shape[-2:])
            weak = crop(full, boxes, data.crop_size)
            strong, strong_augment = strong_view(draws.local, weak)
            mix = bool(torch.rand(1, generator=draws.shared) < cfg.cutmix_prob)
            if mix:  # CutMix: a box of the source crop pasted into the weak target crop
                mix_box = cutmix_box(draws.shared, cfg.cutmix_box)
                source_images = as_float_images(source_batch["image"], self.device)
                source_boxes = self.crop_boxes(draws.shared, full.shape[0], source_images.shape[-2:])
                weak = torch.where(box_mask(mix_box, data.crop_size, self.device)[:, None],
                                   crop(source_images, source_boxes, data.crop_size), weak)

            with torch.no_grad(), self.autocast():
                ema_out = teacher(full)
                ema_feat, ema_logits = ema_out["feat"].float(), ema_out["out"].float()
                weak_feat = crop(ema_feat, boxes, quarter)
                prototype_logits = prototype_similarity(weak_feat, loss_sl.prototypes_ema, cfg.temperature)
                soft = crop(batch["soft"].to(self.device).float(), boxes, quarter)
                labels, confidence = rectify_pseudo_labels(soft, prototype_logits, cfg.rectify_threshold, IGNORE_INDEX)
                if mix:
                    source_labels = crop(source_batch["label"].to(self.device).long()[:, None], source_boxes, quarter)[:, 0]
                    labels = torch.where(box_mask(mix_box, quarter, self.device), source_labels, labels)
                warped, valid = strong_augment.apply_to_maps(prototype_logits, fill=0.0)
                consistency_target = warped.softmax(1)

            with self.autocast():
                weak_logits = resize(net(weak)["out"], quarter).float()
                strong_feat = resize(net(strong)["feat"], quarter).float()
            loss_seg = cfg.rce_alpha * F.cross_entropy(weak_logits, labels, ignore_index=IGNORE_INDEX) \
                + cfg.rce_beta * reverse_cross_entropy(weak_logits, labels)
            strong_log_probabilities = prototype_similarity(strong_feat, loss_sl.prototypes_ema, cfg.temperature).log_softmax(1)
            entropy_terms = consistency_target * (consistency_target.clamp_min(1e-12).log() - strong_log_probabilities)
            # The official mask counts (class, pixel) entries: the mean KL per pixel over K.
            valid_entries = valid.sum().clamp_min(1) * self.protocol.num_classes
            loss_consistency = (entropy_terms.sum(1) * valid).sum() / valid_entries
            loss_self_labeling = loss_sl(ema_feat, ema_logits)
            total_loss = loss_seg + cfg.consistency_weight * loss_consistency + cfg.self_labeling_weight * loss_self_labeling
            scaler.scale(total_loss).backward()
            self.dist.average_gradients([loss_sl.prototypes])  # DDP averages only the network's
            scaler.step(optimizer)
            scaler.update()
            ema_update(teacher, student, cfg.ema_momentum)
            loss_sl.update_ema()
            return {"loss_source": loss_source.item(), "loss_seg": loss_seg.item(), "loss_consist": loss_consistency.item(),
                    "loss_SL": loss_self_labeling.item(), "pseudo_conf": confidence.float().mean().item(), "lr": lr}

        self.train_loop(stage, start, cfg.iterations, modules, step, student)

    # -- stages 2 and 3: self-distillation

    def distill(self, number: int, teacher_stage: str) -> None:
        stage, cfg, data = f"distill{number}", self.config.distill, self.config.data
        teacher = self.stage_model(teacher_stage)
        teacher.load_state_dict(load_torch_file(self.selected_weights(teacher_stage)))
        teacher.to(self.device).eval()
        pseudo = self.pseudo_labels(teacher, teacher_stage, flip=True, with_prototypes=False)
        student_init = self.student_init(number)
        if student_init == "teacher":
            student = self.stage_model(stage).to(self.device)
            # A student with bn_pretrain of a teacher without one starts with a fresh bn_pretrain.
            missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
            if unexpected or any(not name.startswith("bn_pretrain.") for name in missing):
                raise ValueError(f"the {teacher_stage} weights do not fit the {stage} student: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        else:
            student = self.stage_model(stage, cfg.pretrained or self.config.model.pretrained).to(self.device)
        student.train()
        for param in student.parameters():
            param.requires_grad_(True)
        net = self.parallel(student)
        optimizer = self.optimizer(student, cfg.optim)
        scaler = self.new_scaler()
        modules = {"model": student, "optimizer": optimizer, "scaler": scaler}
        start = self.resume_modules(stage, modules)
        source = self.source_batches(start)
        target = self.target_batches(pseudo, start)
        quarter = (data.crop_size[0] // 4, data.crop_size[1] // 4)

        def step(iteration: int, draws: Draws) -> Dict[str, float]:
            lr = poly_lr(optimizer, cfg.optim.lr, iteration, cfg.iterations, cfg.optim.poly_power)
            optimizer.zero_grad(set_to_none=True)
            loss_source = self.source_backward(net, next(source), draws.shared, scaler)
            batch = next(target)
            full = as_float_images(batch["image"], self.device)
            boxes = self.crop_boxes(draws.shared, full.shape[0], full.shape[-2:])
            strong, strong_augment = strong_view(draws.local, crop(full, boxes, data.crop_size))
            with torch.no_grad():
                soft = crop(batch["soft"].to(self.device).float(), boxes, quarter)
                confidence, labels = soft.max(1)
                labels = torch.where(confidence > cfg.confidence, labels, IGNORE_INDEX)
                labels = strong_augment.apply_to_maps(labels[:, None], fill=IGNORE_INDEX)[0][:, 0]
                with self.autocast():
                    teacher_probabilities = resize(teacher(strong)["out"].float(), quarter).softmax(1)
            with self.autocast():
                student_logits = resize(net(strong)["out"], quarter).float()
            loss_pseudo = F.cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX)
            loss_kd = distillation_kl(student_logits, teacher_probabilities, cfg.kl)
            total_loss = loss_pseudo + cfg.kd_weight * loss_kd
            scaler.scale(total_loss).backward()
            scaler.step(optimizer)
            scaler.update()
            return {"loss_source": loss_source.item(), "loss_pseudo": loss_pseudo.item(), "loss_kd": loss_kd.item(), "lr": lr}

        self.train_loop(stage, start, cfg.iterations, modules, step, student)

    # -- evaluation

    @torch.no_grad()
    def logits_of(self, model: nn.Module, image: Tensor) -> Tensor:
        """(1, K, H, W) logits at the image's size: whole image, or averaged sliding windows."""
        size = tuple(image.shape[-2:])
        if self.config.eval.mode == "whole":
            with self.autocast():
                return resize(model(image)["out"].float(), size)
        if self.config.eval.mode != "slide":
            raise ValueError(f"eval.mode must be whole or slide, got {self.config.eval.mode!r}")
        window = [min(w, s) for w, s in zip(self.config.eval.window, size)]
        stride = [max(w * 2 // 3, 1) for w in window]
        total = torch.zeros(1, self.protocol.num_classes, *size, device=image.device)
        hits = torch.zeros(1, 1, *size, device=image.device)
        tops = sorted({min(t, size[0] - window[0]) for t in range(0, size[0], stride[0])})
        lefts = sorted({min(l, size[1] - window[1]) for l in range(0, size[1], stride[1])})
        for top in tops:
            for left in lefts:
                part = image[..., top:top + window[0], left:left + window[1]]
                with self.autocast():
                    total[..., top:top + window[0], left:left + window[1]] += resize(model(part)["out"].float(), window).softmax(1)
                hits[..., top:top + window[0], left:left + window[1]] += 1
        return total / hits

    @torch.no_grad()
    def evaluate(self, model: nn.Module, name: str, save_images: bool = True,
                 step: Optional[Tuple[str, int]] = None) -> Dict[str, Any]:
        """mIoU of ``model`` on the target val set; prints the per-class table and, at a
        ``(stage, iteration)`` step, writes the mIoU to TensorBoard."""
        was_training = model.training
        model.eval()
        confusion = ConfusionMatrix(self.protocol.num_classes)
        input_size = tuple(self.config.data.target_size)
        for index in tqdm(range(len(self.target_val)), desc=f"evaluate {name}", disable=not self.config.train.progress, leave=False):
            sample = self.target_val[index]
            image = as_float_images(sample["image"][None], self.device)
            label = sample["label"].long()
            logits = self.logits_of(model, resize(image, input_size) if tuple(image.shape[-2:]) != input_size else image)
            prediction = resize(logits, tuple(label.shape)).argmax(1)[0].cpu()
            confusion.update(prediction, label)
            if save_images and index < self.config.eval.save_images:
                colour_png(self.output / "predictions" / name / f"{index:06d}.png", prediction, self.protocol)
        model.train(was_training)
        iou = confusion.iou()
        result = {"per_class_iou": dict(zip(self.protocol.class_names, [None if v != v else round(100 * v, 2) for v in iou.tolist()])),
                  "mIoU": round(100 * confusion.miou(), 2)}
        for subset, positions in self.protocol.extra_subsets.items():
            result[subset] = round(100 * confusion.miou(positions), 2)
        tqdm.write(iou_table(self.protocol.class_names, iou, title=f"== {name}: target val IoU (%)"))
        if self.writer is not None and step is not None:
            self.writer.add_scalar(f"{step[0]}/mIoU", result["mIoU"], step[1])
        return result

    # -- the whole run

    def stages(self) -> List[Tuple[str, Callable[[], None]]]:
        plan = [("warmup", self.warmup), ("cpsl", self.cpsl)]
        previous = "cpsl"
        for number in range(1, self.config.distill.stages + 1):
            plan.append((f"distill{number}", lambda n=number, p=previous: self.distill(n, p)))
            previous = f"distill{number}"
        return plan

    def run(self, resume: Optional[Path] = None) -> Dict[str, Any]:
        """Runs every stage not completed yet, from ``resume`` if given; the main rank holds the
        output folder's lock throughout (a second run on the folder is refused)."""
        with OutputLock(self.output) if self.dist.is_main else nullcontext():
            return self._run(resume)

    def _run(self, resume: Optional[Path]) -> Dict[str, Any]:
        if resume is not None:
            self.load_checkpoint(resume)
        if self.dist.is_main:
            (self.output / "config.yaml").write_text(self.config.to_yaml())
        self.log(self.describe())
        for name, stage in self.stages():
            if name in self.state["completed"]:
                continue
            torch.manual_seed(iteration_seed(self.config.train.seed, name, -1))  # initial weights, alike on all ranks
            stage()
            if self.dist.is_main:
                self.state["metrics"][name] = self.select(name)
            self.dist.barrier()
            self.state["completed"] = self.state["completed"] + [name]
            self.save_checkpoint(name, 0, {})
        return self.write_metrics() if self.dist.is_main else {}

    def student_init(self, number: int) -> str:
        """How distillation stage ``number`` (1-based) starts its student: distill.student_init's
        value, or its entry for the stage (the last entry for stages past the list's end)."""
        choice = self.config.distill.student_init
        if isinstance(choice, list):
            choice = choice[min(number, len(choice)) - 1] if choice else None
        if choice not in ("pretrained", "teacher"):
            raise ValueError(f"distill.student_init must be pretrained or teacher (or a list of them), got {choice!r}")
        return choice

    def stage_iterations(self, stage: str) -> int:
        if stage == "warmup":
            return 0 if self.config.warmup.weights else self.config.warmup.iterations
        return self.config.cpsl.iterations if stage == "cpsl" else self.config.distill.iterations

    def select(self, stage: str) -> Dict[str, Any]:
        """Main rank, at the end of ``stage``: evaluates its last weights, keeps them if they are its
        best, and returns the metrics of the weights ``eval.select`` picks, with the selection."""
        model = self.stage_model(stage)
        weights = load_torch_file(self.stage_weights(stage))
        model.load_state_dict(weights)
        end = self.stage_iterations(stage)
        last = self.evaluate(model.to(self.device), stage, step=(stage, end))
        self.keep_if_best(stage, end, last, weights)
        best = self.state["best"][stage]
        chosen, iteration = (best["result"], best["iteration"]) if self.config.eval.select == "best" else (last, end)
        return {**chosen, "selection": {"rule": self.config.eval.select, "iteration": iteration,
                                        "last_mIoU": last["mIoU"], "best_mIoU": best["result"]["mIoU"],
                                        "best_iteration": best["iteration"]}}

    def write_metrics(self) -> Dict[str, Any]:
        stages = self.state["metrics"]
        final = list(stages)[-1]
        metrics = {"source_only": stages["warmup"], "adapted": stages[final], "adapted_stage": final,
                   "mIoU_gain": round(stages[final]["mIoU"] - stages["warmup"]["mIoU"], 2),
                   "selection": SELECTION_NOTES[self.config.eval.select], "stages": stages}
        path = self.output / "metrics.json"
        path.write_text(json.dumps(metrics, indent=2))
        tqdm.write(f"source-only mIoU {stages['warmup']['mIoU']:.2f} → adapted ({final}) mIoU "
                   f"{stages[final]['mIoU']:.2f} (gain {metrics['mIoU_gain']:+.2f}); metrics written to {path}")
        return metrics
