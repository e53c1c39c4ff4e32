"""The official colour transfer of GTA5 images (examples/cpsl_trainer/colour.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cpsl_trainer.colour import WithColourTransfer, lab_to_rgb, match_lab_statistics, rgb_to_lab  # noqa: E402
from cpsl_trainer.training import EpochBatches  # noqa: E402


def test_lab_conversion_matches_cie_reference_values_and_inverts():
    # sRGB white, red and mid grey under D65 (CIE values, as skimage gives them).
    lab = rgb_to_lab(np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5]]))
    np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=1e-2)
    np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=5e-2)
    np.testing.assert_allclose(lab[2], [53.39, 0.0, 0.0], atol=5e-2)
    rgb = np.random.default_rng(0).random((64, 3))
    np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-6)


def test_matched_image_takes_the_reference_statistics():
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 40, 60, generator=generator) * 120 + 60).to(torch.uint8)  # dull, unclipped
    reference = (torch.rand(3, 30, 50, generator=generator) * 100 + torch.tensor([120, 60, 30])[:, None, None]).to(torch.uint8)
    matched = match_lab_statistics(image, reference)
    assert matched.dtype == torch.uint8 and matched.shape == image.shape
    got = rgb_to_lab(matched.permute(1, 2, 0).numpy() / 255.0).reshape(-1, 3)
    want = rgb_to_lab(reference.permute(1, 2, 0).numpy() / 255.0).reshape(-1, 3)
    np.testing.assert_allclose(got.mean(0), want.mean(0), atol=1.0)  # up to uint8 truncation and clipping
    np.testing.assert_allclose(got.std(0), want.std(0), rtol=0.1, atol=0.5)
    flat = torch.full((3, 8, 8), 90, dtype=torch.uint8)  # a flat channel takes the reference mean
    assert match_lab_statistics(flat, reference).float().flatten(1).std(1).max() < 1


class Images(torch.utils.data.Dataset):
    def __init__(self, count, value):
        self.count, self.value = count, value

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        image = torch.full((3, 4, 4), (self.value + 10 * index) % 200, dtype=torch.uint8)
        image[0, 0, 0] = 0  # not flat
        return {"image": image, "name": f"{index}.png"}


def test_each_occurrence_draws_its_target_image_reproducibly():
    source, target = Images(3, 20), Images(50, 40)
    data = WithColourTransfer(source, target, seed=7)
    same = [data[1]["image"] for _ in range(2)]
    assert torch.equal(same[0], same[1]) and data[1]["name"] == "1.png"
    epochs = {tuple(data[1 + 3 * epoch]["image"].flatten().tolist()) for epoch in range(8)}
    assert len(epochs) > 1  # another epoch, another target image
    tagged = next(iter(EpochBatches(3, 3, seed=1, start_batch=2, epoch_tags=True)))
    assert sorted(index % 3 for index in tagged) == [0, 1, 2] and all(index // 3 == 2 for index in tagged)
    with pytest.raises(ValueError, match="at least one target image"):
        WithColourTransfer(source, Images(0, 0), seed=1)
