"""Soft pseudo labels of a trained model on the target training set, the class prior and the
prototype initialization; stored per image and keyed to the weights that made them."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Dict

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


class PseudoLabels(RunContext):
    """Writes and reuses the soft pseudo labels of a model on the target training set."""

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
