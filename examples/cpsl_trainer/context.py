"""The explicit context every part of a run is built from: the config, the process's place in
the job, the device, the datasets, new networks and optimizers, autocast and logging."""

from __future__ import annotations

import platform
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

import cpsl_ops

from .colour import WithColourTransfer
from .config import AMP_DTYPES, Config, OptimConfig
from .config_check import check_config
from .data import CityscapesDataset, GTA5Dataset, SynthiaDataset
from .distributed import Distributed, synchronize_batch_norm
from .model import DeepLabV2
from .optim import make_optimizer, RepeatedSGD
from .training import batches, choose_device, protocol_of, WithSoftLabels
from .views import ViewMaker


class RunContext:
    """What the stages, the loop and its hooks share: the checked config, this process's place in
    the job, the device, the datasets, the output folder and the TensorBoard writer."""

    def __init__(self, config: Config, context: Optional[Distributed] = None, training: bool = True) -> None:
        self.config = config = check_config(config, training)
        self.dist = context or Distributed()
        self.output = Path(config.train.output_dir)
        self.output.mkdir(parents=True, exist_ok=True)
        self.device = choose_device(config.train.device, self.dist.local_rank)
        self.protocol = protocol_of(config.data.protocol)
        self.dist.share(config.data.batch_size)  # an uneven share fails here, not at the first batch
        self.views = ViewMaker(config.data, self.dist, self.device)
        self.writer = None
        if config.train.tensorboard and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output / "tensorboard"))
        self.target_val = CityscapesDataset(config.data.target_root, "val", classes=self.protocol.classes_argument)

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

    def log(self, text: str) -> None:
        if self.dist.is_main:
            tqdm.write(text)

    def autocast(self) -> ContextManager[Any]:
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

    def new_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, active only under fp16 autocast (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.config.train.amp == "fp16")

    def source_batches(self, start: int) -> Iterator[Dict[str, Any]]:
        """Source training batches from batch ``start`` on (the same order after a resume)."""
        return batches(self.source, self.config, self.config.train.seed, start, self.dist)

    def target_batches(self, pseudo: Optional[Path], start: int) -> Iterator[Dict[str, Any]]:
        """Target training batches from batch ``start`` on, with the soft pseudo labels stored
        under ``pseudo`` if given."""
        target = self.target_train if pseudo is None else WithSoftLabels(self.target_train, pseudo)
        return batches(target, self.config, self.config.train.seed + 1, start, self.dist)

    @property
    def quarter_crop(self) -> Tuple[int, int]:
        """The crop at output stride 4, where the target losses are taken (as officially)."""
        crop_size = self.config.data.crop_size
        return crop_size[0] // 4, crop_size[1] // 4

    def optimizer(self, model: DeepLabV2, optim_config: OptimConfig, extra: Sequence[Dict[str, Any]] = ()) -> RepeatedSGD:
        return make_optimizer(model, optim_config.lr, optim_config.head_lr_mult, extra, optim_config.momentum,
                              optim_config.weight_decay, optim_config.official_step)
