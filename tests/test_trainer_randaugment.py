"""The example trainer's strong view: the official RandAugmentMC against PIL, which the official
code applies, and its geometry shared by the image and the teacher's maps."""

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageDraw, ImageEnhance, ImageOps  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cpsl_trainer.augment import box_mask, warp  # noqa: E402
from cpsl_trainer.randaugment import (  # noqa: E402
    GEOMETRIC_OPS, GREY, PHOTOMETRIC, POOL, StrongRecipe, affine, apply_recipe, cutout_box, strong_view)

FILL = (127, 127, 127)


def smooth_image(seed: int, size=(96, 160)) -> Image.Image:
    """A smooth RGB image, so that resampling differences stay below a level."""
    coarse = np.random.default_rng(seed).integers(30, 220, (12, 20, 3)).astype(np.uint8)
    return Image.fromarray(coarse).resize(size[::-1], Image.BILINEAR)


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def as_levels(tensor: torch.Tensor) -> np.ndarray:
    return (tensor * 255).round().permute(1, 2, 0).numpy()


PIL_PHOTOMETRIC = {
    "autocontrast": lambda image, _: ImageOps.autocontrast(image),
    "brightness": lambda image, v: ImageEnhance.Brightness(image).enhance(v),
    "color": lambda image, v: ImageEnhance.Color(image).enhance(v),
    "contrast": lambda image, v: ImageEnhance.Contrast(image).enhance(v),
    "equalize": lambda image, _: ImageOps.equalize(image),
    "identity": lambda image, _: image,
    "posterize": lambda image, v: ImageOps.posterize(image, int(v)),
    "sharpness": lambda image, v: ImageEnhance.Sharpness(image).enhance(v),
    "solarize": lambda image, v: ImageOps.solarize(image, 256 - v),
}


@pytest.mark.parametrize("name,value", [
    ("autocontrast", 0.0), ("brightness", 0.32), ("color", 0.68), ("contrast", 0.14), ("equalize", 0.0),
    ("identity", 0.0), ("posterize", 5), ("sharpness", 0.5), ("solarize", 102), ("solarize", 230),
])
def test_photometric_operations_match_pil_to_a_level(name, value):
    image = smooth_image(1)
    ours = as_levels(PHOTOMETRIC[name](as_tensor(image), value))
    expected = np.asarray(PIL_PHOTOMETRIC[name](image, value), dtype=np.float64)
    assert np.abs(ours - expected).max() <= 1.0


def pil_geometric(image: Image.Image, name: str, value: float) -> Image.Image:
    if name == "rotate":
        return image.rotate(value, resample=Image.BILINEAR, fillcolor=FILL)
    width, height = image.size
    coefficients = {"shear_x": (1, value, 0, 0, 1, 0), "shear_y": (1, 0, 0, value, 1, 0),
                    "translate_x": (1, 0, int(value * width), 0, 1, 0),
                    "translate_y": (1, 0, 0, 0, 1, int(value * height))}[name]
    return image.transform(image.size, Image.AFFINE, coefficients, resample=Image.BILINEAR, fillcolor=FILL)


@pytest.mark.parametrize("name,value", [
    ("rotate", 27), ("rotate", -12), ("shear_x", 0.27), ("shear_x", -0.09), ("shear_y", 0.18), ("shear_y", -0.27),
    ("translate_x", 0.27), ("translate_x", -0.15), ("translate_y", 0.21), ("translate_y", -0.1),
])
def test_geometric_operations_match_pil(name, value):
    image = smooth_image(2)
    size = (image.size[1], image.size[0])
    ours = as_levels(warp(as_tensor(image)[None], affine(name, value, size)[None, :2], size, fill=GREY)[0])
    expected = np.asarray(pil_geometric(image, name, value), dtype=np.float64)
    # PIL and grid_sample blend the pixels at the image's edges with the fill apart: compare the
    # pixels at least two away from an edge, in the output and in the input.
    ones = torch.ones(1, 1, *size)
    ones[..., :2, :] = ones[..., -2:, :] = ones[..., :, :2] = ones[..., :, -2:] = 0
    inside = warp(ones, affine(name, value, size)[None, :2], size, fill=0.0)[0, 0]
    inside = -torch.nn.functional.max_pool2d(-inside[None], 5, stride=1, padding=2)[0] == 1
    difference = np.abs(ours - expected)[inside.numpy()]
    assert inside.float().mean() > 0.4 and difference.max() <= 1.0


def test_recipes_draw_the_official_distribution():
    generator = torch.Generator().manual_seed(0)
    recipes = [StrongRecipe.sample(generator) for _ in range(2000)]
    for attribute, rate in (("flip", 0.5), ("blur", 0.5)):
        assert abs(np.mean([getattr(r, attribute) for r in recipes]) - rate) < 0.05
    assert abs(np.mean([bool(r.jitter) for r in recipes]) - 0.5) < 0.05
    # Two operations drawn, each applied with p = 0.5: one per image on average, of all 14 kinds.
    assert abs(np.mean([len(r.ops) for r in recipes]) - 1.0) < 0.08
    counts = Counter(name for r in recipes for name, _ in r.ops)
    assert set(counts) == set(POOL) and min(counts.values()) > 0.5 * max(counts.values())
    values = {name: [v for r in recipes for n, v in r.ops if n == name] for name in POOL}
    assert max(map(abs, values["rotate"])) == 27 and min(map(abs, values["rotate"])) == 3
    for name in ("shear_x", "shear_y", "translate_x", "translate_y"):
        magnitudes = np.abs(values[name])
        assert magnitudes.max() == pytest.approx(0.27) and magnitudes.min() == pytest.approx(0.03)
        assert 0.3 < np.mean(np.array(values[name]) > 0) < 0.7  # either sign
    assert set(values["posterize"]) == {4, 5, 6, 7}
    assert 0.14 - 1e-9 <= min(values["brightness"]) and max(values["brightness"]) <= 0.86 + 1e-9
    for recipe in recipes:
        if recipe.jitter:
            factors = dict(recipe.jitter)
            assert sorted(factors) == ["brightness", "contrast", "hue", "saturation"]
            assert abs(factors["hue"]) <= 0.4 and all(0.6 <= factors[k] <= 1.4 for k in ("brightness", "contrast"))


def test_cutout_is_pil_s_square_of_a_third_of_the_short_side_clipped_at_the_borders():
    for centre in ((0.5, 0.5), (0.0, 0.99), (0.99, 0.01), (0.3, 0.7)):
        box = cutout_box(centre, (64, 128))
        top, left, height, width = box
        assert 0 <= top and top + height <= 1 and 0 <= left and left + width <= 1
        # The official CutoutAbs: PIL draws the rectangle (x0, y0, x0 + 21, y0 + 21) inclusive.
        image = Image.new("RGB", (128, 64))
        x0, y0 = int(max(0, centre[1] * 128 - 10.5)), int(max(0, centre[0] * 64 - 10.5))
        ImageDraw.Draw(image).rectangle((x0, y0, min(128, x0 + 21), min(64, y0 + 21)), FILL)
        expected = torch.from_numpy(np.array(image)[..., 0] == FILL[0])
        assert torch.equal(box_mask(torch.tensor([box]), (64, 128), torch.device("cpu"))[0], expected)


def test_teacher_maps_follow_the_image_through_every_geometric_operation():
    # An image whose channels are smooth functions of position: warping it as a map (nearest,
    # once) must land where the strong view's successive bilinear warps put it.
    height, width = 48, 80
    ys, xs = torch.meshgrid(torch.linspace(0.2, 0.8, height), torch.linspace(0.2, 0.8, width), indexing="ij")
    image = torch.stack([ys, xs, (ys + xs) / 2])
    ops = tuple((name, value) for name, value in zip(GEOMETRIC_OPS, (17, 0.15, -0.1, 0.12, -0.08)))
    recipe = StrongRecipe(flip=True, blur=False, jitter=(), ops=ops, cutout_centre=(0.3, 0.7))
    strong, augment = strong_view(image[None], [recipe])
    warped, valid = augment.apply_to_maps(image[None], fill=-1.0)
    assert 0.3 < valid.float().mean() < 0.95
    assert torch.all(strong[0][:, ~valid[0]].eq(GREY).all(0) | (warped[0][:, ~valid[0]] == -1).all(0))
    # Away from the edges of what is valid and of the image, where bilinear sampling blends in
    # the fill or the edge, the map sampled once (nearest) and the image warped step by step
    # (bilinear) agree to the rounding of one nearest sample (a step of this image is 0.013 per
    # pixel down, 0.008 across).
    padded = torch.nn.functional.pad(valid.float(), (1, 1, 1, 1))
    inside = -torch.nn.functional.max_pool2d(-padded, 3, stride=1)[0] == 1
    error = (strong[0] - warped[0]).abs()[:, inside]
    assert inside.float().mean() > 0.25 and error.max() < 0.015 and error.mean() < 0.003
    # The cutout is grey in the image and invalid in the maps, at any resolution.
    _, quarter_valid = augment.apply_to_maps(image[None, :, ::4, ::4], fill=-1.0)
    box = augment.cutout[0]
    assert not quarter_valid[0, int((box[0] + box[2] / 2) * 12), int((box[1] + box[3] / 2) * 20)]


def test_a_recipe_without_operations_changes_only_the_cutout():
    image = as_tensor(smooth_image(3, (32, 48)))
    recipe = StrongRecipe(flip=False, blur=False, jitter=(), ops=(), cutout_centre=(0.5, 0.5))
    strong, steps, box = apply_recipe(image, recipe)
    assert steps == []
    changed = (strong != image).any(0)
    top, left = round(box[0] * 32), round(box[1] * 48)
    assert changed.sum() <= 11 * 11 and changed[top:top + 11, left:left + 11].all()
