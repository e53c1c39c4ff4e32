"""Batched augmentation on tensors, with every random draw taken from an explicit generator.

Geometry is described in normalized coordinates, so one draw can be applied at any resolution:
the weak crop is cut from the full image, from its soft pseudo label at stride 8 and from the EMA
features of the full image (the official ``full2weak``), and the strong view's warp is applied to
the teacher's maps at stride 4 (the official ``label_strong_T``).

Two conventions, as in the official code: images and full-resolution labels are resized by PIL
(pixel centres at (i + 0.5) / size, ``align_corners=False``; bilinear downscaling antialiased), the
network's stride-8 maps by ``F.interpolate(..., align_corners=True)`` (first and last pixel centres
on the image's first and last ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .labels import IGNORE_INDEX


def uniform(generator: torch.Generator, size: Sequence[int], low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(tuple(size), generator=generator)


def bernoulli(generator: torch.Generator, size: int, p: float) -> Tensor:
    return torch.rand(size, generator=generator) < p


@dataclass
class CropBoxes:
    """Per-sample crop boxes (top, left, height, width) as fractions of the image, and h-flips."""

    boxes: Tensor  # (B, 4) float
    flips: Tensor  # (B,) bool

    @classmethod
    def sample(
        cls,
        generator: torch.Generator,
        batch: int,
        image_size: Sequence[int],
        crop_size: Sequence[int],
        scale_range: Sequence[float],
        base_scale: float = 1.0,
    ) -> "CropBoxes":
        """Random-size crops: the image is rescaled by ``base_scale`` x U(scale_range) and a crop of
        ``crop_size`` cut.

        Where the rescaled image is smaller than the crop, the crop covers that whole side.
        """
        scale = uniform(generator, (batch,), *scale_range) * base_scale
        height = (crop_size[0] / (scale * image_size[0])).clamp(max=1.0)
        width = (crop_size[1] / (scale * image_size[1])).clamp(max=1.0)
        top = torch.rand(batch, generator=generator) * (1 - height)
        left = torch.rand(batch, generator=generator) * (1 - width)
        return cls(torch.stack([top, left, height, width], 1), bernoulli(generator, batch, 0.5))

    def __getitem__(self, rows) -> "CropBoxes":
        return CropBoxes(self.boxes[rows], self.flips[rows])

    def downscales(self, image_size: Sequence[int], size: Sequence[int]) -> Tensor:
        """(B,) bool: whether cropping an ``image_size`` image onto ``size`` shrinks either side."""
        spans = self.boxes[:, 2:] * torch.tensor([float(image_size[0]), float(image_size[1])])
        return (spans > torch.tensor([float(size[0]), float(size[1])]) * (1 + 1e-6)).any(1)

    def theta(self) -> Tensor:
        """(B, 2, 3) affine maps from output to input normalized coordinates."""
        top, left, height, width = self.boxes.unbind(1)
        sign = 1.0 - 2.0 * self.flips.float()
        theta = torch.zeros(len(self.boxes), 2, 3)
        theta[:, 0, 0] = width * sign
        theta[:, 0, 2] = 2 * left + width - 1
        theta[:, 1, 1] = height
        theta[:, 1, 2] = 2 * top + height - 1
        return theta


def warp(
    maps: Tensor, theta: Tensor, size: Sequence[int], mode: str = "bilinear", fill: float = 0.0,
    align_corners: bool = False,
) -> Tensor:
    """Samples (B, C, H, W) float ``maps`` through the (B, 2, 3) ``theta`` onto a ``size`` grid.

    Integer maps (labels) are sampled with nearest and keep their dtype; points that fall
    outside the input get ``fill`` (IGNORE_INDEX for integer maps). With a non-zero fill, bilinear
    samples at the input's edge blend with the edge pixels, not with zeros, as PIL's do.
    ``align_corners`` is grid_sample's: False for images and labels (PIL's convention), True for
    the network's stride-8 maps (the official ``F.interpolate(..., align_corners=True)``).
    """
    grid = F.affine_grid(theta.to(maps.device, torch.float32), [maps.shape[0], 1, *size], align_corners=align_corners)
    if not maps.is_floating_point():
        sampled = warp(maps.float(), theta, size, "nearest", float(IGNORE_INDEX), align_corners)
        return sampled.round().to(maps.dtype)
    grid = grid.to(maps.dtype)
    padding = "zeros" if fill == 0.0 else "border"
    out = F.grid_sample(maps, grid, mode=mode, padding_mode=padding, align_corners=align_corners)
    if fill != 0.0:
        inside = F.grid_sample(torch.ones_like(maps[:, :1]), grid, mode="nearest", align_corners=align_corners)
        out = torch.where(inside > 0.5, out, torch.full_like(out, fill))
    return out


def crop(maps: Tensor, boxes: CropBoxes, size: Sequence[int], mode: str = "bilinear", align_corners: bool = False) -> Tensor:
    """The ``boxes`` of ``maps`` resized onto a ``size`` grid (then flipped where the boxes say): the
    official rescale-and-crop (``RandomSized``, ``RandomCrop``, ``RandomHorizontallyFlip``).

    ``align_corners=False``: images and full-resolution labels, which the official code resizes
    with PIL. Float maps that the crop shrinks are filtered as PIL's bilinear resize filters them
    (:func:`antialiased_crop`); enlarged ones are sampled bilinearly, as PIL samples them.
    ``align_corners=True``: the network's stride-8 maps (soft pseudo labels, EMA features), which the
    official code resizes with ``F.interpolate(..., mode="bilinear", align_corners=True)`` before
    cutting the crop (its ``full2weak`` and its soft labels' path); never filtered, as there.
    """
    out = warp(maps, boxes.theta(), size, mode, align_corners=align_corners)
    if align_corners or mode != "bilinear" or not maps.is_floating_point():
        return out
    shrunk = boxes.downscales(maps.shape[-2:], size).nonzero().flatten()
    if len(shrunk):
        rows = shrunk.to(maps.device)
        out[rows] = antialiased_crop(maps[rows], boxes[shrunk], size)
    return out


def pil_bilinear_weights(start: Tensor, span: Tensor, in_size: int, out_size: int, device: torch.device) -> Tensor:
    """(B, out_size, in_size) weights of PIL's bilinear resize of the pixels [start, start + span)
    of a side of ``in_size`` pixels onto ``out_size`` pixels (Pillow's ``precompute_coeffs``).

    Output pixel i is centred at start + (i + 0.5) span / out_size; input pixel x (centred at
    x + 0.5) weighs max(0, 1 - |x + 0.5 - centre| / s), s = max(span / out_size, 1): a triangle
    stretched by the shrinking factor, which is PIL's antialiasing. The weights are normalized
    over the pixels inside the image (at the border, as PIL does)."""
    scale = (span / out_size).to(device, torch.float64)
    stretch = scale.clamp(min=1.0)
    centres = start.to(device, torch.float64)[:, None] + (torch.arange(out_size, device=device) + 0.5) * scale[:, None]
    pixels = torch.arange(in_size, device=device, dtype=torch.float64) + 0.5
    weights = (1 - (pixels - centres[:, :, None]).abs() / stretch[:, None, None]).clamp(min=0)
    return weights / weights.sum(-1, keepdim=True)


def antialiased_crop(images: Tensor, boxes: CropBoxes, size: Sequence[int]) -> Tensor:
    """(B, C, H, W) float ``images``: each box resized onto ``size`` as PIL's
    ``resize(size, BILINEAR, box=...)`` would (separable, :func:`pil_bilinear_weights`), then
    flipped where the box says. The weak view's shrinking crops: the official code rescales the
    image with PIL's bilinear filter (antialiased below scale 1) before cutting its crop."""
    height, width = images.shape[-2:]
    top, left, box_height, box_width = boxes.boxes.double().unbind(1)
    rows = pil_bilinear_weights(top * height, box_height * height, height, size[0], images.device)
    cols = pil_bilinear_weights(left * width, box_width * width, width, size[1], images.device)
    dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    out = rows.to(dtype)[:, None] @ images.to(dtype) @ cols.to(dtype).transpose(1, 2)[:, None]
    out = torch.where(boxes.flips.to(images.device)[:, None, None, None], out.flip(-1), out)
    return out.to(images.dtype)


@dataclass
class StrongAugment:
    """The geometry of a batch of strong views (randaugment.py): the warp each image went
    through and its cutout, so that the teacher's maps can follow."""

    thetas: Tensor  # (B, S, 2, 3): the S warps of each image in order, output → input coordinates
    cutout: Tensor  # (B, 4) fractions (top, left, height, width)

    def cutout_mask(self, size: Sequence[int], device: torch.device) -> Tensor:
        """(B, 1, H, W) bool, True inside the cutout square."""
        return box_mask(self.cutout, size, device)[:, None]

    def apply_to_maps(self, maps: Tensor, fill: float) -> Tuple[Tensor, Tensor]:
        """Warps teacher maps (B, C, h, w) as the image was warped; returns (maps, valid mask), the
        mask False where the image shows the cutout or what one of its warps brought in from
        outside. The warps are composed and the maps sampled once (nearest), so that rounding
        does not add up over the warps. align_corners=False, as the official ``affine_sample``
        (grid_sample's default) and the PIL warps of the image have it."""
        batch, size = maps.shape[0], maps.shape[-2:]
        identity = torch.eye(2, 3, device=maps.device).expand(batch, 2, 3)
        grid = F.affine_grid(identity, [batch, 1, *size], align_corners=False)  # (B, h, w, 2) as (x, y)
        inside = torch.ones(grid.shape[:3], dtype=torch.bool, device=maps.device)
        for step in reversed(self.thetas.to(maps.device).unbind(1)):  # the last warp maps the output first
            grid = grid @ step[:, None, :, :2].transpose(-1, -2) + step[:, None, None, :, 2]
            inside &= (grid.abs() <= 1).all(-1)
        warped = F.grid_sample(maps.float(), grid, mode="nearest", padding_mode="border", align_corners=False)
        valid = inside[:, None] & ~self.cutout_mask(size, maps.device)
        warped = torch.where(valid, warped, torch.full_like(warped, fill))
        return warped.to(maps.dtype), valid[:, 0]


CUTMIX_BOXES = ("official", "clipped")


def cutmix_box(generator: torch.Generator, shape: str = "official") -> Tensor:
    """A (1, 4) box (top, left, height, width), as fractions of the crop, shared by the batch.

    ``official``: the official code's box, of exactly half the crop's area, its height fraction
    0.5 ** U(0, 1) (so height/width lies in [0.5, 2]) and placed uniformly inside the crop.
    ``clipped``: a square of half the area around a uniform centre, clipped at the borders (mean
    area about 0.34).
    """
    if shape == "official":
        height = 0.5 ** float(torch.rand(1, generator=generator))
        width = 0.5 / height
        top, left = (torch.rand(2, generator=generator) * torch.tensor([1 - height, 1 - width])).tolist()
        return torch.tensor([[top, left, height, width]])
    if shape != "clipped":
        raise ValueError(f"cpsl.cutmix_box must be one of {CUTMIX_BOXES}, got {shape!r}")
    side = math.sqrt(0.5)
    centre = torch.rand(2, generator=generator)
    low = (centre - side / 2).clamp(0, 1)
    high = (centre + side / 2).clamp(0, 1)
    return torch.cat([low, high - low])[None]


def box_mask(boxes: Tensor, size: Sequence[int], device: torch.device) -> Tensor:
    """(B, H, W) bool masks of (B, 4) fractional (top, left, height, width) boxes."""
    ys = (torch.arange(size[0], device=device) + 0.5) / size[0]
    xs = (torch.arange(size[1], device=device) + 0.5) / size[1]
    top, left, height, width = (v.to(device)[:, None] for v in boxes.unbind(1))
    rows = (ys >= top) & (ys < top + height)
    cols = (xs >= left) & (xs < left + width)
    return rows[:, :, None] & cols[:, None, :]
