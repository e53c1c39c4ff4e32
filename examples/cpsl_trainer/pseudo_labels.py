"""Soft pseudo labels of a trained model on the target training set, the class prior and the
prototype initialization; stored per image and keyed to the weights that made them."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import cpsl_ops
from cpsl_ops import class_distribution

from .context import RunContext
from .files import load_torch_file
from .training import as_float_images, colour_png
from .training import soft_label_file


def weights_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter and buffer, naming the weights that made a set of pseudo labels."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class PrototypeInit:
    """The official ``calc_prototype.py``: per class, the running mean over images of the image's
    class mean feature, for images where the class has at least ``min_pixels`` predicted pixels,
    the count capped at 3000 (later images then weigh 1/3001 each)."""

    CAP = 3000

    def __init__(self, num_classes: int, feat_dim: int, min_pixels: int) -> None:
        self.means = torch.zeros(num_classes, feat_dim, dtype=torch.float64)
        self.images = torch.zeros(num_classes, dtype=torch.long)
        self.min_pixels = min_pixels

    def add(self, image_means: Tensor, pixels: Tensor) -> None:
        """One image's (K, D) class means and (K,) predicted pixels per class."""
        present = pixels.cpu() >= self.min_pixels
        seen = self.images[present].double()[:, None]
        self.means[present] = (self.means[present] * seen + image_means.cpu()[present].double()) / (seen + 1)
        self.images[present] = (self.images[present] + 1).clamp(max=self.CAP)

    def missing(self) -> List[int]:
        """The classes no image contributed to."""
        return (self.images == 0).nonzero().flatten().tolist()

    def prototypes(self) -> Tensor:
        """(K, D) float32; the classes no image predicted start random (torch's global generator)."""
        means = self.means.clone()
        missing = self.images == 0
        means[missing] = torch.randn(int(missing.sum()), means.shape[1]).double()
        return means.float()


class PseudoLabelMaker:
    """Writes and reuses the soft pseudo labels of a model on the target training set."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Tensor, flip: bool) -> Dict[str, Tensor]:
        with self.context.autocast():
            out = model(images)
            probabilities = out["out"].float().softmax(1)
            if flip:
                flipped = model(images.flip(-1))["out"].float().softmax(1).flip(-1)
                probabilities = (probabilities + flipped) / 2
        return {"probabilities": probabilities, "feat": out["feat"].float()}

    def pseudo_dir(self, name: str) -> Path:
        return self.context.output / "pseudo" / name

    def make(self, model: nn.Module, name: str, flip: bool, with_prototypes: bool) -> Path:
        """Rank 0 writes them (:meth:`generate`) while the other ranks wait."""
        if self.context.dist.is_main:
            self.generate(model, name, flip, with_prototypes)
        self.context.dist.barrier()
        return self.pseudo_dir(name)

    @torch.no_grad()
    def generate(self, model: nn.Module, name: str, flip: bool, with_prototypes: bool) -> Path:
        """Soft labels (K, h, w) fp16 of every target train image at stride 8, the class prior of
        the argmax predictions and, for stage 1, the prototype initialization (class means). They
        are reused only if made by the same weights, options and images (``summary.pt``'s key)."""
        context, config = self.context, self.context.config
        directory, images = self.pseudo_dir(name), context.target_train
        key = {"weights": weights_fingerprint(model), "flip": flip, "with_prototypes": with_prototypes,
               "images": [pair[0].relative_to(images.root).as_posix() for pair in images.pairs],
               "size": list(config.data.target_size)}
        if (directory / "summary.pt").exists() and load_torch_file(directory / "summary.pt").get("key") == key:
            return directory
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        model.eval()
        classes, feat_dim = context.protocol.num_classes, config.model.feat_dim
        counts = torch.zeros(classes, dtype=torch.float64)
        prototypes = PrototypeInit(classes, feat_dim, config.cpsl.prototype_min_pixels)
        image_means = torch.zeros(classes, feat_dim, device=context.device)
        loader = DataLoader(images, batch_size=config.data.batch_size, num_workers=config.data.num_workers)
        index = 0
        for batch in tqdm(loader, desc=f"pseudo labels ({name})", disable=not config.train.progress, leave=False):
            out = self.predict(model, as_float_images(batch["image"], context.device), flip)
            predictions = out["probabilities"].argmax(1)
            counts += class_distribution(predictions, classes).double() * predictions.numel()
            for soft, feat, labels, image_name in zip(out["probabilities"], out["feat"], predictions, batch["name"]):
                np.save(soft_label_file(directory, image_name), soft.half().cpu().numpy())
                if index < config.eval.save_images:
                    colour_png(context.output / "pseudo_labels" / name / f"{index:06d}.png", labels, context.protocol)
                index += 1
                if not with_prototypes:
                    continue
                image_means.zero_()  # momentum 0 below: the buffer becomes this image's class means
                pixels = cpsl_ops.update_prototypes_(image_means, feat[None], labels[None], momentum=0.0)
                prototypes.add(image_means, pixels)
        missing = [context.protocol.class_names[k] for k in prototypes.missing()]
        if with_prototypes and missing:
            tqdm.write(f"note: no target image predicts {missing}; their prototypes start random")
        prior = (counts / counts.sum()).float().clamp_min(1e-6)
        summary = {"prior": prior / prior.sum(), "key": key}
        if with_prototypes:
            summary["prototypes"] = prototypes.prototypes()
        torch.save(summary, directory / "summary.pt")
        return directory
