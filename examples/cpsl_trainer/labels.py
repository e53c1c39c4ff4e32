"""Label conventions of the datasets: Cityscapes ids → train ids, SYNTHIA ids, class names and the
official Cityscapes colour palette."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

IGNORE_INDEX = 255

# The 19 Cityscapes evaluation classes, in train-id order.
CITYSCAPES_CLASSES: List[str] = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]

# Official cityscapesScripts labels.py: label id → train id for the 19 evaluated classes; every
# other id (void, parking, rail track, guard rail, bridge, tunnel, pole group, caravan, trailer,
# license plate) is ignored. GTA5's labels use the same ids.
CITYSCAPES_ID_TO_TRAIN_ID: Dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}

# Official colours of the 19 train ids (sky is 70, 130, 180).
CITYSCAPES_PALETTE: List[tuple] = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]

# SYNTHIA-RAND-CITYSCAPES class ids (first channel of GT/LABELS) → Cityscapes train ids of the 16
# classes the two datasets share (no terrain, truck or train).
SYNTHIA_ID_TO_TRAIN_ID: Dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
}
SYNTHIA_16_TRAIN_IDS: List[int] = sorted(SYNTHIA_ID_TO_TRAIN_ID.values())
# The 13-class protocol drops wall, fence and pole.
SYNTHIA_13_TRAIN_IDS: List[int] = [t for t in SYNTHIA_16_TRAIN_IDS if t not in (3, 4, 5)]


def lookup_table(mapping: Dict[int, int], size: int = 256 * 256) -> np.ndarray:
    """A uint8 table t with t[id] = mapping[id] and IGNORE_INDEX for every other id below ``size``."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for source, target in mapping.items():
        table[source] = target
    return table


CITYSCAPES_TABLE = lookup_table(CITYSCAPES_ID_TO_TRAIN_ID, 256)
SYNTHIA_TABLE = lookup_table(SYNTHIA_ID_TO_TRAIN_ID)


def cityscapes_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes/GTA5 label ids (uint8 array) → train ids, ignored classes → IGNORE_INDEX."""
    if label_ids.dtype != np.uint8:
        raise TypeError(f"Cityscapes and GTA5 label ids are uint8, got {label_ids.dtype}")
    return CITYSCAPES_TABLE[label_ids]


def synthia_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """SYNTHIA class ids (the first channel of the 16-bit GT/LABELS PNG) → Cityscapes train ids."""
    if label_ids.dtype not in (np.uint16, np.uint8):
        raise TypeError(f"SYNTHIA label ids are 16-bit, got {label_ids.dtype}")
    return SYNTHIA_TABLE[label_ids]


def restrict_classes(train_ids: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """Train ids renumbered 0..len(kept)-1 in the order of ``kept``; other classes → IGNORE_INDEX.

    For evaluating the 16- and 13-class SYNTHIA protocols on 19-class Cityscapes labels.
    """
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    table[list(kept)] = np.arange(len(kept), dtype=np.uint8)
    return table[train_ids]


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) train ids → (H, W, 3) uint8 RGB with the Cityscapes palette; ignored pixels black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(CITYSCAPES_PALETTE)] = CITYSCAPES_PALETTE
    return palette[train_ids]
