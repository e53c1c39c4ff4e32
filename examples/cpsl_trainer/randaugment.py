"""The strong view: the official RandAugmentMC (FixMatch's pool of 14 operations) on tensors.

Per image, drawn as the official code (lslrh/CPSL, ``data/randaugment.py``) draws it: a
horizontal flip, a Gaussian blur (σ = 1) and a colour jitter (brightness, contrast, saturation
and hue, in random order), each with p = 0.5; then ``num_ops`` operations drawn with replacement
from the pool, each at a level drawn from 1..magnitude-1 and applied with p = 0.5; last a grey
cutout square of a third of the short side.

The geometric operations are kept as the sequence of affine warps they are, so that the
teacher's maps follow the image exactly: composed in the same order and sampled once, with what
one warp moved out of the image kept out (``augment.StrongAugment``). The official code warps the
maps one kind at a time in a fixed order (so two draws of one kind keep only the last) and scales
their translations by the height.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from .augment import box_mask, StrongAugment, warp

GREY = 127 / 255  # the official fill of cutout and of pixels warped in from outside the image
PARAMETER_MAX = 10  # a level's scale: value = level / PARAMETER_MAX * max_value + bias
BLUR_SIGMA = 1.0  # PIL's GaussianBlur(radius=1): the radius is the standard deviation

# FixMatch's pool: each operation's (max value, bias), or None where it takes no value.
POOL: Dict[str, Optional[Tuple[float, float]]] = {
    "autocontrast": None, "brightness": (0.9, 0.05), "color": (0.9, 0.05), "contrast": (0.9, 0.05),
    "equalize": None, "identity": None, "posterize": (4, 4), "rotate": (30, 0), "sharpness": (0.9, 0.05),
    "shear_x": (0.3, 0), "shear_y": (0.3, 0), "solarize": (256, 0), "translate_x": (0.3, 0), "translate_y": (0.3, 0),
}
INTEGER_OPS = ("posterize", "rotate", "solarize")
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")  # these take a random sign
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")

PHOTOMETRIC: Dict[str, Callable[[Tensor, float], Tensor]] = {
    "autocontrast": lambda image, _: TF.autocontrast(image),
    "brightness": TF.adjust_brightness,
    "color": TF.adjust_saturation,  # PIL's ImageEnhance.Color
    "contrast": TF.adjust_contrast,
    "equalize": lambda image, _: TF.equalize(image),
    "identity": lambda image, _: image,
    "posterize": lambda image, bits: TF.posterize(image, int(bits)),
    "sharpness": TF.adjust_sharpness,
    "solarize": lambda image, value: TF.solarize(image, (256 - value) / 255),  # PIL inverts levels ≥ 256 - value
    "saturation": TF.adjust_saturation,
    "hue": TF.adjust_hue,
}


def affine(name: str, value: float, size: Sequence[int]) -> Tensor:
    """(3, 3) map from output to input normalized coordinates of a geometric operation on an
    image of ``size`` (H, W), as PIL applies it: rotations by ``value`` degrees about the centre,
    shears about the top-left corner, translations by ``value`` of the side in whole pixels."""
    aspect = size[1] / size[0]
    matrix = torch.eye(3)
    if name == "rotate":
        cos, sin = math.cos(math.radians(value)), math.sin(math.radians(value))
        matrix[:2, :2] = torch.tensor([[cos, -sin / aspect], [sin * aspect, cos]])
    elif name == "shear_x":  # x_in = x + value * y in pixels, from the top-left corner
        matrix[0, 1] = matrix[0, 2] = value / aspect
    elif name == "shear_y":
        matrix[1, 0] = matrix[1, 2] = value * aspect
    elif name == "translate_x":
        matrix[0, 2] = 2 * int(value * size[1]) / size[1]
    elif name == "translate_y":
        matrix[1, 2] = 2 * int(value * size[0]) / size[0]
    else:
        raise ValueError(f"{name!r} is not a geometric operation")
    return matrix


HORIZONTAL_FLIP = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))


def setting_problems(num_ops: int, magnitude: int, jitter: float) -> List[str]:
    """What is wrong with strong-view settings that the draws cannot take, one line per setting
    (the official code asserts the magnitude's range, and a jitter above 1 would allow negative
    factors)."""
    problems = []
    if not (isinstance(num_ops, int) and num_ops >= 0):
        problems.append(f"data.strong_ops={num_ops!r}: must be a whole number ≥ 0")
    if not (isinstance(magnitude, int) and 2 <= magnitude <= PARAMETER_MAX):
        problems.append(f"data.strong_magnitude={magnitude!r}: must be a whole number in [2, {PARAMETER_MAX}]")
    if not 0.0 <= jitter <= 1.0:
        problems.append(f"data.strong_jitter={jitter!r}: must lie in [0, 1]")
    return problems


@dataclass(frozen=True)
class StrongRecipe:
    """One image's draw of RandAugmentMC: what is applied, in order, with its values."""

    flip: bool
    blur: bool
    jitter: Tuple[Tuple[str, float], ...]  # empty when the jitter is not applied
    ops: Tuple[Tuple[str, float], ...]  # the pool operations applied
    cutout_centre: Tuple[float, float]  # (y, x) as fractions of the image

    @classmethod
    def sample(cls, generator: torch.Generator, num_ops: int = 2, magnitude: int = 10, jitter: float = 0.4) -> "StrongRecipe":
        def coin() -> bool:
            return float(torch.rand(1, generator=generator)) < 0.5

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand(1, generator=generator))

        flip, blur = coin(), coin()
        jitter_ops: Tuple[Tuple[str, float], ...] = ()
        if coin():  # torchvision's ColorJitter: the four adjustments in a random order
            factors = {"brightness": uniform(1 - jitter, 1 + jitter), "contrast": uniform(1 - jitter, 1 + jitter),
                       "saturation": uniform(1 - jitter, 1 + jitter), "hue": uniform(-min(0.5, jitter), min(0.5, jitter))}
            order = torch.randperm(len(JITTER_OPS), generator=generator).tolist()
            jitter_ops = tuple((JITTER_OPS[i], factors[JITTER_OPS[i]]) for i in order)
        names = list(POOL)
        ops = []
        for _ in range(num_ops):
            name = names[int(torch.randint(len(names), (1,), generator=generator))]
            level = int(torch.randint(1, magnitude, (1,), generator=generator))
            if coin():
                ops.append((name, _value(name, level, coin)))
        centre = (float(torch.rand(1, generator=generator)), float(torch.rand(1, generator=generator)))
        return cls(flip, blur, jitter_ops, tuple(ops), centre)


def _value(name: str, level: int, coin: Callable[[], bool]) -> float:
    scale = POOL[name]
    if scale is None:
        return 0.0
    max_value, bias = scale
    value = level * max_value / PARAMETER_MAX
    value = (int(value) if name in INTEGER_OPS else value) + bias
    return -value if name in GEOMETRIC_OPS and coin() else value


def cutout_box(centre: Tuple[float, float], size: Sequence[int]) -> List[float]:
    """(top, left, height, width) fractions of the official cutout: from half a third of the
    short side before the centre, a third of the short side plus one pixel (PIL's rectangle
    includes both corners), clipped at the borders, in whole pixels."""
    side = min(size) // 3
    box = []
    for fraction, extent in zip(centre, size):
        start = int(max(0.0, fraction * extent - side / 2))
        box.append((start, min(extent, start + side + 1) - start))
    (top, height), (left, width) = box
    return [top / size[0], left / size[1], height / size[0], width / size[1]]


def apply_recipe(image: Tensor, recipe: StrongRecipe) -> Tuple[Tensor, List[Tensor], List[float]]:
    """One (3, H, W) image in [0, 1] through ``recipe``: (strong image, its warps in order as
    (2, 3) output → input maps, its cutout box)."""
    size = tuple(image.shape[-2:])
    steps = []
    if recipe.flip:
        image = image.flip(-1)
        steps.append(HORIZONTAL_FLIP[:2])
    if recipe.blur:
        radius = math.ceil(3 * BLUR_SIGMA)
        image = TF.gaussian_blur(image, [2 * radius + 1] * 2, [BLUR_SIGMA] * 2)
    for name, value in recipe.jitter + recipe.ops:
        if name in GEOMETRIC_OPS:
            steps.append(affine(name, value, size)[:2])
            image = warp(image[None], steps[-1][None], size, "bilinear", fill=GREY)[0]
        else:
            image = PHOTOMETRIC[name](image, value)
    box = cutout_box(recipe.cutout_centre, size)
    image = torch.where(box_mask(torch.tensor([box]), size, image.device), GREY, image)
    return image.clamp(0, 1), steps, box


def strong_view(images: Tensor, recipes: Sequence[StrongRecipe]) -> Tuple[Tensor, StrongAugment]:
    """The strong views of (B, 3, H, W) images in [0, 1], one recipe each, and the geometry
    (warp and cutout) that the teacher's maps must follow."""
    if len(recipes) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images need as many recipes, got {len(recipes)}")
    views, steps, boxes = zip(*(apply_recipe(image, recipe) for image, recipe in zip(images, recipes)))
    # Images with fewer warps are padded with the identity, which nearest sampling keeps exact.
    count = max(map(len, steps))
    identity = torch.eye(3)[:2]
    thetas = torch.stack([torch.stack(list(s) + [identity] * (count - len(s))) if count else torch.empty(0, 2, 3)
                          for s in steps])
    return torch.stack(views), StrongAugment(thetas, torch.tensor(boxes))
