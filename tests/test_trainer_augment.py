"""The example trainer's resampling conventions against the official code's (lslrh/CPSL): the
network's stride-8 maps resized with ``F.interpolate(..., align_corners=True)``, images rescaled
by PIL's bilinear resize (antialiased when it shrinks them) before the weak crop is cut."""

import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cpsl_trainer.augment import CropBoxes, crop, warp  # noqa: E402
from cpsl_trainer.config import Config  # noqa: E402
from cpsl_trainer.evaluation import Evaluator  # noqa: E402
from cpsl_trainer.training import protocol_of, resize  # noqa: E402


def official_upsample(maps: torch.Tensor, size) -> torch.Tensor:
    """The official ``F.interpolate(out, size=..., mode='bilinear', align_corners=True)``."""
    return nn.Upsample(size=tuple(size), mode="bilinear", align_corners=True)(maps)


# ----------------------------------------------------------------------------- stride-8 maps


def test_resize_of_stride8_maps_is_the_official_align_corners_upsample():
    # A 65x113 map is DeepLabV2's output on a 512x896 crop (ceil-mode pooling): the official code
    # upsamples it to the crop, to the stride-4 grid and to the evaluated image with corners aligned.
    maps = torch.randn(2, 19, 65, 113, dtype=torch.float64)
    for size in [(512, 896), (128, 224)]:
        torch.testing.assert_close(resize(maps, size), official_upsample(maps, size), rtol=0, atol=1e-12)
    # Images and full-resolution maps keep PIL's pixel-centre convention when asked.
    image = torch.rand(1, 3, 20, 30, dtype=torch.float64)
    torch.testing.assert_close(resize(image, (10, 15), align_corners=False),
                               F.interpolate(image, size=(10, 15), mode="bilinear", align_corners=False))


class FixedOutput(nn.Module):
    """A 'network' whose logits are a fixed stride-8 map, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, image: torch.Tensor):
        return {"out": self.logits}


def evaluation_with(mode: str, window=(64, 128)) -> Evaluator:
    config = Config()
    config.eval.mode, config.eval.window, config.train.amp = mode, list(window), "none"
    # No datasets: only logits_of is called, which reads the config, protocol and autocast.
    return Evaluator(SimpleNamespace(config=config, protocol=protocol_of("cityscapes19"), autocast=nullcontext))


def test_evaluation_upsamples_stride8_logits_as_the_official_validate():
    # train.py's validate(): F.interpolate(out['out'], size=images_val.size()[2:], mode='bilinear',
    # align_corners=True), argmax. Up to 4 px of misplacement near the borders otherwise.
    logits = torch.randn(1, 19, 9, 17)
    image = torch.zeros(1, 3, 64, 128)
    expected = official_upsample(logits, (64, 128))
    torch.testing.assert_close(evaluation_with("whole").logits_of(FixedOutput(logits), image), expected)
    # One sliding window covering the image is the whole image (softmax of the same logits).
    torch.testing.assert_close(evaluation_with("slide").logits_of(FixedOutput(logits), image), expected.softmax(1))


def ramp(rows: int, columns: int) -> torch.Tensor:
    """(1, 2, rows, columns): each pixel's row and column index, so that a bilinear sample tells
    where it was taken (bilinear interpolation is exact on a linear function)."""
    grid = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(columns, dtype=torch.float64),
                          indexing="ij")
    return torch.stack(grid)[None]


# Official draws on a 64x128 image (stride-8 maps of 9x17, as ceil-mode pooling gives): RandomSized
# to 48x96 (scale 0.75), RandomCrop of 32x64 at (y1, x1) (top-left, middle, bottom-right); the
# losses' grid is the crop at stride 4 (8x16).
FULL, STRIDE8, SCALED, CROP = (64, 128), (9, 17), (48, 96), (32, 64)
QUARTER = (CROP[0] // 4, CROP[1] // 4)
CROPS_AT = [(0, 0), (8, 16), (16, 32)]


def official_full2weak(feat: torch.Tensor, at, flip: bool) -> torch.Tensor:
    """adaptation_modelv2.full2weak: to the rescaled image at stride 4 (align_corners=True), crop, flip."""
    feat = F.interpolate(feat, size=[SCALED[0] // 4, SCALED[1] // 4], mode="bilinear", align_corners=True)
    y1, x1 = at[0] // 4, at[1] // 4
    feat = feat[:, :, y1:y1 + QUARTER[0], x1:x1 + QUARTER[1]]
    return feat.flip(-1) if flip else feat


def official_soft_label(soft: torch.Tensor, at, flip: bool) -> torch.Tensor:
    """The soft pseudo label's path: Compose's upsample to the image, RandomSized, RandomCrop,
    RandomHorizontallyFlip, then the step's scale_factor=0.25 (all align_corners=True)."""
    soft = F.interpolate(soft, size=list(FULL), mode="bilinear", align_corners=True)
    soft = F.interpolate(soft, size=list(SCALED), mode="bilinear", align_corners=True)
    soft = soft[:, :, at[0]:at[0] + CROP[0], at[1]:at[1] + CROP[1]]
    soft = soft.flip(-1) if flip else soft
    return F.interpolate(soft, scale_factor=0.25, mode="bilinear", align_corners=True)


def trainer_boxes(at, flip: bool) -> CropBoxes:
    """The same draw as the trainer's boxes: fractions of the image (top, left, height, width)."""
    box = [at[0] / SCALED[0], at[1] / SCALED[1], CROP[0] / SCALED[0], CROP[1] / SCALED[1]]
    return CropBoxes(torch.tensor([box], dtype=torch.float64), torch.tensor([flip]))


@pytest.mark.parametrize("at", CROPS_AT)
@pytest.mark.parametrize("flip", [False, True])
def test_stride8_crop_is_the_official_full2weak_exactly_in_its_corner_coordinates(at, flip):
    # With the box given in align_corners coordinates (first to last pixel centre), the crop of a
    # stride-8 map is the official full2weak itself.
    quarter_rows, quarter_columns = SCALED[0] // 4 - 1, SCALED[1] // 4 - 1
    y1, x1 = at[0] // 4, at[1] // 4
    box = [y1 / quarter_rows, x1 / quarter_columns, (QUARTER[0] - 1) / quarter_rows, (QUARTER[1] - 1) / quarter_columns]
    boxes = CropBoxes(torch.tensor([box], dtype=torch.float64), torch.tensor([flip]))
    feat = torch.randn(1, 5, *STRIDE8, dtype=torch.float64)
    torch.testing.assert_close(crop(feat, boxes, QUARTER, align_corners=True), official_full2weak(feat, at, flip),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("official, within", [(official_full2weak, 0.25), (official_soft_label, 0.06)],
                         ids=["full2weak", "soft_label"])
@pytest.mark.parametrize("flip", [False, True])
def test_stride8_crops_sample_where_the_official_code_does(official, within, flip):
    # Where each stride-4 loss pixel takes its EMA feature / soft label from, in stride-8 pixels
    # (about 8 image pixels): with the trainer's boxes, within a quarter of one of the official
    # full2weak (whose grid itself lies up to 0.2 from the official soft labels' one) and within
    # 0.06 of the official soft labels. The pixel-centre convention is more than one off at the
    # crop's corners, and fades to zero past the map's last pixel centre (bottom, right).
    ramps, ones = ramp(*STRIDE8), torch.ones(1, 1, *STRIDE8, dtype=torch.float64)
    centred_error = 0.0
    for at in CROPS_AT:
        boxes = trainer_boxes(at, flip)
        expected = official(ramps, at, flip)
        assert (crop(ramps, boxes, QUARTER, align_corners=True) - expected).abs().max() < within
        assert torch.allclose(crop(ones, boxes, QUARTER, align_corners=True), torch.ones((), dtype=torch.float64))
        centred_error = max(centred_error, (crop(ramps, boxes, QUARTER) - expected).abs().max().item())
    assert centred_error > 1.0
    assert crop(ones, trainer_boxes(CROPS_AT[-1], flip), QUARTER).min() < 0.9


def test_stride8_crop_of_the_whole_image_is_the_official_upsample():
    feat = torch.randn(2, 4, *STRIDE8, dtype=torch.float64)
    boxes = CropBoxes(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2, dtype=torch.float64), torch.tensor([False, True]))
    expected = official_upsample(feat, (16, 32))
    expected[1] = expected[1].flip(-1)
    torch.testing.assert_close(crop(feat, boxes, (16, 32), align_corners=True), expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the weak view's rescaling


def pil_resize_box(image: torch.Tensor, box, flip: bool, size) -> torch.Tensor:
    """PIL's bilinear resize of the fractional ``box`` (top, left, height, width) of a (C, H, W)
    float image onto ``size``, each channel as a 32-bit float image (no rounding), then flipped."""
    height, width = image.shape[-2:]
    top, left, box_height, box_width = box
    pixels = (left * width, top * height, (left + box_width) * width, (top + box_height) * height)
    channels = [np.asarray(Image.fromarray(channel.numpy(), "F").resize(size[::-1], Image.BILINEAR, box=pixels))
                for channel in image.float()]
    out = torch.from_numpy(np.stack(channels))
    return out.flip(-1) if flip else out


SHRINKING_BOXES = [[0.1, 0.2, 0.7, 0.6], [0.0, 0.0, 1.0, 1.0], [0.25, 0.05, 0.5, 0.9]]


def test_a_shrinking_weak_crop_is_pils_antialiased_bilinear_resize():
    # RandomSized rescales with PIL's bilinear resize, whose filter is stretched by the shrinking
    # factor (antialiased); the crop is then cut. Grid sampling alone aliases.
    image = torch.rand(3, 3, 60, 100)
    size = (20, 32)  # every box above shrinks the image (scales 0.36 to 0.67)
    boxes = CropBoxes(torch.tensor(SHRINKING_BOXES), torch.tensor([False, True, True]))
    out = crop(image, boxes, size)
    plain = warp(image, boxes.theta(), size)
    for b, box in enumerate(SHRINKING_BOXES):
        expected = pil_resize_box(image[b], box, bool(boxes.flips[b]), size)
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-5)
        assert (plain[b] - expected).abs().max() > 0.1  # the plain bilinear crop is not it
    assert boxes.downscales(image.shape[-2:], size).all()


def test_a_shrinking_weak_crop_matches_pil_on_8_bit_images():
    # The official images are 8-bit RGB: PIL rounds (also between its two passes), so within a level.
    levels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 48, 80), dtype=np.uint8))
    boxes = CropBoxes(torch.tensor([[0.1, 0.1, 0.8, 0.75], [0.0, 0.2, 0.9, 0.8]]), torch.tensor([False, True]))
    out = crop(levels.float() / 255, boxes, (24, 40)) * 255
    for b in range(2):
        top, left, height, width = boxes.boxes[b].tolist()
        pixels = (left * 80, top * 48, (left + width) * 80, (top + height) * 48)
        rgb = Image.fromarray(levels[b].permute(1, 2, 0).numpy()).resize((40, 24), Image.BILINEAR, box=pixels)
        expected = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()
        expected = expected.flip(-1) if boxes.flips[b] else expected
        assert (out[b] - expected).abs().max() <= 1.0


def test_only_shrinking_image_crops_change():
    # Enlarging crops (scale >= 1) keep the bilinear sampling PIL also does there, labels stay
    # nearest and stride-8 maps are never filtered (the official F.interpolate is not).
    image = torch.rand(3, 3, 60, 100)
    generator = torch.Generator().manual_seed(0)
    boxes = CropBoxes.sample(generator, 3, (60, 100), (30, 50), (1.0, 1.4))
    assert torch.equal(crop(image, boxes, (30, 50)), warp(image, boxes.theta(), (30, 50)))
    mixed = CropBoxes(torch.tensor([[0.1, 0.2, 0.7, 0.6], [0.2, 0.2, 0.25, 0.25]]), torch.tensor([True, False]))
    labels = torch.randint(0, 19, (2, 1, 60, 100))
    assert torch.equal(crop(labels, mixed, (20, 32), mode="nearest"), warp(labels, mixed.theta(), (20, 32)))
    assert torch.equal(crop(labels, mixed, (20, 32)), warp(labels, mixed.theta(), (20, 32)))
    out = crop(image[:2], mixed, (20, 32))  # the first box shrinks (scale 0.48), the second enlarges
    assert torch.equal(out[1], warp(image[1:2], mixed[1:2].theta(), (20, 32))[0])
    assert not torch.equal(out[0], warp(image[:1], mixed[:1].theta(), (20, 32))[0])
    assert boxes.downscales((60, 100), (30, 50)).tolist() == [False] * 3
    assert mixed.downscales((60, 100), (20, 32)).tolist() == [True, False]
    assert torch.equal(crop(image[:2], mixed, (20, 32), align_corners=True),
                       warp(image[:2], mixed.theta(), (20, 32), align_corners=True))


def test_the_official_draws_shrink_the_gta5_image_in_about_43_percent_of_crops():
    # A long side of U(0.5, 1.5) x 2,200 from GTA5's 2048-pixel one: below scale 1 when U < 2048/2200.
    image_size, crop_size = (1024, 2048), (512, 896)
    boxes = CropBoxes.sample(torch.Generator().manual_seed(0), 20_000, image_size, crop_size, (0.5, 1.5), 2200 / 2048)
    share = boxes.downscales(image_size, crop_size).float().mean().item()
    assert share == pytest.approx(2048 / 2200 - 0.5, abs=0.01)
