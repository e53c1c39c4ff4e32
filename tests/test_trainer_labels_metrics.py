"""The example trainer's label tables, palette and mIoU (examples/cpsl_trainer)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cpsl_trainer.labels import (  # noqa: E402
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    SYNTHIA_13_TRAIN_IDS,
    SYNTHIA_16_TRAIN_IDS,
    cityscapes_to_train_ids,
    colorize,
    restrict_classes,
    synthia_to_train_ids,
)
from cpsl_trainer.metrics import ConfusionMatrix, iou_table  # noqa: E402


def test_cityscapes_train_ids():
    ids = np.array([[0, 7, 8, 9], [23, 26, 33, 34]], dtype=np.uint8)
    expected = np.array([[IGNORE_INDEX, 0, 1, IGNORE_INDEX], [10, 13, 18, IGNORE_INDEX]], dtype=np.uint8)
    np.testing.assert_array_equal(cityscapes_to_train_ids(ids), expected)
    assert sorted(set(cityscapes_to_train_ids(np.arange(256, dtype=np.uint8)).tolist()) - {IGNORE_INDEX}) == list(range(19))
    with pytest.raises(TypeError, match="uint8"):
        cityscapes_to_train_ids(ids.astype(np.int32))


def test_synthia_protocols():
    ids = np.array([3, 4, 2, 1, 8, 11, 0, 13, 22], dtype=np.uint16)
    np.testing.assert_array_equal(synthia_to_train_ids(ids), [0, 1, 2, 10, 13, 18, 255, 255, 255])
    assert len(SYNTHIA_16_TRAIN_IDS) == 16 and len(SYNTHIA_13_TRAIN_IDS) == 13
    assert not {9, 14, 16} & set(SYNTHIA_16_TRAIN_IDS)  # terrain, truck, train are not in SYNTHIA
    renumbered = restrict_classes(np.array([0, 3, 10, 18, 9], dtype=np.uint8), SYNTHIA_13_TRAIN_IDS)
    np.testing.assert_array_equal(renumbered, [0, IGNORE_INDEX, SYNTHIA_13_TRAIN_IDS.index(10), 12, IGNORE_INDEX])


def test_palette_and_colorize():
    assert len(CITYSCAPES_PALETTE) == len(CITYSCAPES_CLASSES) == 19
    assert CITYSCAPES_PALETTE[CITYSCAPES_CLASSES.index("sky")] == (70, 130, 180)
    image = colorize(np.array([[10, 0], [255, 18]], dtype=np.uint8))
    assert image.shape == (2, 2, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == (70, 130, 180) and tuple(image[1, 0]) == (0, 0, 0)
    assert tuple(image[1, 1]) == (119, 11, 32)


def test_miou_against_a_hand_computed_confusion_matrix():
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 255, 1])
    predictions = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1, 1])
    metric = ConfusionMatrix(4)
    metric.update(predictions[:5], targets[:5])
    metric.update(predictions[5:], targets[5:])
    expected_matrix = torch.tensor([[2, 1, 0, 0], [0, 2, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    assert torch.equal(metric.matrix, expected_matrix)
    # class 0: TP 2, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: 2/4; class 3: absent
    iou = metric.iou()
    torch.testing.assert_close(iou[:3], torch.full((3,), 0.5, dtype=torch.float64))
    assert torch.isnan(iou[3])
    assert metric.miou() == pytest.approx(0.5)
    assert metric.miou(classes=[0, 1]) == pytest.approx(0.5)
    table = iou_table(["a", "b", "c", "d"], iou)
    assert "50.00" in table and "n/a" in table and table.splitlines()[-1].endswith("50.00")


def test_confusion_matrix_rejects_bad_labels():
    metric = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="predictions must lie"):
        metric.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets must lie"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="differ"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0]))
