"""The inputs of one training step: weak crops of the source and target images, the target's strong
view and CutMix, all drawn from one explicit generator.

Everything is drawn for the global batch and each rank keeps its rows, so the views do not depend
on the number of ranks. The order of the draws is part of the recipe's reproducibility (a resumed
run draws what the uninterrupted one did): source crop, target crop, strong view, CutMix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .augment import box_mask, crop, CropBoxes, cutmix_box, StrongAugment
from .config import DataConfig
from .distributed import Distributed
from .randaugment import strong_view, StrongRecipe
from .training import as_float_images


@dataclass
class SourceView:
    """A weakly augmented crop of each source image (float in [0, 1]) and its labels."""

    images: Tensor  # (B, 3, h, w)
    labels: Tensor  # (B, h, w) long; empty for an unlabelled batch


@dataclass
class TargetViews:
    """The target images of one step, as every loss sees them.

    ``weak`` is the weak crop, with the source crop pasted into the CutMix box when ``mix_mask``
    is set; ``strong`` the strong view of the (unmixed) weak crop, ``strong_augment`` its geometry.
    ``draws`` is the step's generator after the views, for what the losses draw (pixel samples).
    """

    full: Tensor  # (B, 3, H, W) the whole images
    boxes: CropBoxes  # the weak crops' boxes in the whole images
    weak: Tensor  # (B, 3, h, w)
    strong: Optional[Tensor] = None
    strong_augment: Optional[StrongAugment] = None
    mix_mask: Optional[Tensor] = None  # (1, h, w) bool, True inside the batch's CutMix box
    draws: Optional[torch.Generator] = None


@dataclass
class Views:
    """A step's source view and, for stages that train on the target, its target views."""

    source: SourceView
    target: Optional[TargetViews] = None


class ViewMaker:
    """Draws the views of a step for this rank's share of the global batch."""

    def __init__(self, data: DataConfig, dist: Distributed, device: torch.device) -> None:
        self.data, self.dist, self.device = data, dist, device

    def crop_boxes(self, generator: torch.Generator, batch: int, image_size: Sequence[int]) -> CropBoxes:
        """Crops drawn for the global batch, this rank's rows: the same crops at any world size."""
        data = self.data
        base_scale = 1.0 if data.scale_long_side is None else data.scale_long_side / max(image_size)
        boxes = CropBoxes.sample(generator, batch * self.dist.world_size, image_size, data.crop_size, data.scale_range,
                                 base_scale)
        return boxes[self.dist.rows(batch)]

    def strong_view(self, generator: torch.Generator, images: Tensor) -> Tuple[Tensor, StrongAugment]:
        """RandAugmentMC views of this rank's ``images``, drawn for the global batch like the crops."""
        data = self.data
        recipes = [StrongRecipe.sample(generator, data.strong_ops, data.strong_magnitude, data.strong_jitter)
                   for _ in range(images.shape[0] * self.dist.world_size)]
        return strong_view(images, recipes[self.dist.rows(images.shape[0])])

    def weak_crop(self, batch: Dict[str, Any], generator: torch.Generator) -> Tuple[Tensor, CropBoxes, Tensor]:
        """The whole images (float in [0, 1]), the crop boxes drawn for them and the crops."""
        images = as_float_images(batch["image"], self.device)
        boxes = self.crop_boxes(generator, images.shape[0], images.shape[-2:])
        return images, boxes, crop(images, boxes, self.data.crop_size)

    def source_view(self, batch: Dict[str, Any], generator: torch.Generator) -> SourceView:
        _, boxes, crops = self.weak_crop(batch, generator)
        labels = batch["label"].to(self.device).long()
        labels = crop(labels[:, None], boxes, self.data.crop_size)[:, 0] if labels.dim() == 3 else labels
        return SourceView(crops, labels)

    def target_views(self, batch: Dict[str, Any], generator: torch.Generator, strong: bool = True,
                     cutmix: Optional[Tuple[float, str, SourceView]] = None) -> TargetViews:
        """The weak crop; with ``strong`` its strong view; with ``cutmix`` = (probability, box
        shape, source view), a box of the source view's crop pasted into the weak crop with that
        probability (one draw for the batch, as officially)."""
        full, boxes, weak = self.weak_crop(batch, generator)
        views = TargetViews(full, boxes, weak, draws=generator)
        if strong:
            views.strong, views.strong_augment = self.strong_view(generator, weak)
        if cutmix is not None:
            probability, shape, source = cutmix
            if bool(torch.rand(1, generator=generator) < probability):
                views.mix_mask = box_mask(cutmix_box(generator, shape), self.data.crop_size, self.device)
                views.weak = torch.where(views.mix_mask[:, None], source.images, weak)
        return views

    def views(self, source: Dict[str, Any], target: Optional[Dict[str, Any]], generator: torch.Generator,
              strong: bool = True, cutmix: Optional[Tuple[float, str]] = None) -> Views:
        """The step's :class:`Views` of a source batch and, if given, a target batch."""
        source_view = self.source_view(source, generator)
        if target is None:
            return Views(source_view)
        mix = None if cutmix is None else (*cutmix, source_view)
        return Views(source_view, self.target_views(target, generator, strong, mix))
