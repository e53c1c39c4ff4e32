"""The official recipe's colour transfer of GTA5 images: each LAB channel of a source image gets the
mean and standard deviation of a random Cityscapes training image (Reinhard et al.'s transfer, as
the official code does it with skimage's sRGB/D65 conversions, which are written out here)."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423],
                        [0.212671, 0.715160, 0.072169],
                        [0.019334, 0.119193, 0.950227]])
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_EPSILON, _KAPPA = 0.008856, 7.787  # the CIE constants of the cube-root's linear segment


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in [0, 1] -> CIE LAB (L in [0, 100])."""
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE_D65
    f = np.where(xyz > _EPSILON, np.cbrt(xyz), _KAPPA * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE LAB -> (..., 3) sRGB, clipped to [0, 1]."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([lab[..., 1] / 500 + fy, fy, np.maximum(fy - lab[..., 2] / 200, 0)], axis=-1)
    xyz = np.where(f ** 3 > _EPSILON, f ** 3, (f - 16 / 116) / _KAPPA) * _WHITE_D65
    linear = xyz @ _XYZ_TO_RGB.T
    rgb = np.where(linear > 0.0031308, 1.055 * np.abs(linear) ** (1 / 2.4) - 0.055, 12.92 * linear)
    return np.clip(rgb, 0, 1)


def match_lab_statistics(image: Tensor, reference: Tensor) -> Tensor:
    """``image`` (3, H, W) uint8 with each LAB channel's mean and (population) standard deviation
    set to those of ``reference`` (3, H', W') uint8; back to uint8 by truncation, as officially."""
    lab = rgb_to_lab(image.permute(1, 2, 0).numpy() / 255.0)
    target = rgb_to_lab(reference.permute(1, 2, 0).numpy() / 255.0).reshape(-1, 3)
    mean, std = lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0)
    scale = np.where(std > 1e-6, target.std(0) / np.maximum(std, 1e-6), 0.0)  # a flat channel takes the mean
    matched = lab_to_rgb((lab - mean) * scale + target.mean(0)) * 255
    return torch.from_numpy(np.clip(matched, 0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous()


class WithColourTransfer(Dataset):
    """Source samples whose colours are matched to a random target image (:func:`match_lab_statistics`).

    Indices may carry the epoch (``index + len(self) * epoch``, as :class:`EpochBatches` yields
    them with ``epoch_tags``): each (epoch, index) draws its own target image from ``seed``, so
    a resumed run draws the same ones.
    """

    def __init__(self, source: Dataset, target: Dataset, seed: int) -> None:
        if len(target) == 0:
            raise ValueError("colour transfer needs at least one target image")
        self.source, self.target, self.seed = source, target, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, tagged_index: int) -> Dict[str, Any]:
        epoch, index = divmod(int(tagged_index), len(self.source))
        sample = dict(self.source[index])
        choice = int(np.random.default_rng((self.seed, epoch, index)).integers(len(self.target)))
        sample["image"] = match_lab_statistics(sample["image"], self.target[choice]["image"])
        return sample
