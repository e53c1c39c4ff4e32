"""Helpers of the training stages: datasets' protocols, seeded batches, losses, seeds and schedules."""

from __future__ import annotations

import math
import resource
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .colour import WithColourTransfer
from .config import Config
from .data import write_rgb
from .distributed import Distributed
from .files import read_with_path
from .labels import CITYSCAPES_CLASSES, IGNORE_INDEX, SYNTHIA_13_TRAIN_IDS, SYNTHIA_16_TRAIN_IDS, colorize


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


class WithSoftLabels(Dataset):
    """Adds the stored soft pseudo label (K, h, w) of each image as ``sample["soft"]``."""

    def __init__(self, dataset: Dataset, directory: Path) -> None:
        self.dataset, self.directory = dataset, Path(directory)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        sample = dict(self.dataset[index])
        sample["soft"] = torch.from_numpy(read_with_path(soft_label_file(self.directory, sample["name"]), np.load))
        return sample


def batches(dataset: Dataset, config: Config, seed: int, start_batch: int, context: Distributed) -> Iterator[Dict[str, Any]]:
    """This rank's share of each global batch of ``data.batch_size`` images, from batch ``start_batch`` on."""
    sampler = EpochBatches(len(dataset), context.share(config.data.batch_size), seed, start_batch, context.rank,
                           context.world_size,
                           epoch_tags=isinstance(dataset, WithColourTransfer))
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=config.data.num_workers))


# ----------------------------------------------------------------------------- helpers


def as_float_images(images: Tensor, device: torch.device) -> Tensor:
    """uint8 (B, 3, H, W) → float in [0, 1] (the official preprocessing: x/255, no mean/std)."""
    return images.to(device, non_blocking=True).float().div_(255)


def resize(maps: Tensor, size: Tuple[int, int], align_corners: bool = True) -> Tensor:
    """Bilinear resize. The default is the official code's for the network's stride-8 outputs
    (logits and features to the crop, to the stride-4 loss grid, to the evaluated image):
    ``F.interpolate(..., mode="bilinear", align_corners=True)``, corner pixels on corner pixels.
    Images and full-resolution maps, which the official code resizes with PIL, take
    ``align_corners=False`` (PIL's pixel-centre convention)."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=align_corners)


def labelled_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """The CE averaged over the labelled pixels; 0, with a zero gradient, when no pixel is labelled
    (where ``F.cross_entropy`` gives NaN, which would make the logged loss NaN)."""
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def reverse_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """The official RCE: mean over valid pixels of −Σ_k p_k log clamp(onehot_k, 1e-4, 1)."""
    probabilities = logits.float().softmax(1).clamp(1e-7, 1.0)
    valid = labels != IGNORE_INDEX
    picked = probabilities.gather(1, labels.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
    per_pixel = RCE_LOG_CLAMP * (probabilities.sum(1) - picked)
    return per_pixel[valid].mean() if valid.any() else per_pixel.sum() * 0


def iteration_seed(seed: int, stage: str, iteration: int, rank: int = 0) -> int:
    """A distinct, reproducible seed for every (stage, iteration, rank)."""
    return (seed * 1_000_003 + sum(map(ord, stage)) * 7_919 + iteration + rank * 2**40) % (2**63)


def poly_lr(optimizer: torch.optim.Optimizer, base_lr: float, iteration: int, total: int, power: float) -> float:
    factor = max(1.0 - iteration / max(total, 1), 0.0) ** power
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group["lr_mult"] * factor
    return base_lr * factor


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
        raise ValueError(f"train.stop_after={text!r}: must look like stage:iteration (e.g. cpsl:500)")
    return stage, int(iteration)


def no_sync(model: nn.Module):
    """Accumulate this backward locally; DDP averages the sum at the iteration's last backward."""
    return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else nullcontext()


SELECTION_NOTES = {
    "best": "each stage's best evaluation on the target val set (every eval.every iterations and at its end), "
            "as the paper and the official code select; the last weights' mIoU is stages.<stage>.selection.last_mIoU",
    "last": "each stage's last weights; its best evaluation is stages.<stage>.selection.best_mIoU",
}
