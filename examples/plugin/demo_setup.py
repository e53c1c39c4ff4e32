"""What both self-training loops share: the demo data in memory, the demo's model, random crops,
a source-only warm-up and the target-val mIoU. Nothing here is specific to DAFormer or CPSL."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXAMPLES = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(EXAMPLES))

from cpsl_trainer.config import load_config  # noqa: E402
from cpsl_trainer.data import CityscapesDataset, GTA5Dataset  # noqa: E402
from cpsl_trainer.demo_data import write_demo_datasets  # noqa: E402
from cpsl_trainer.labels import IGNORE_INDEX  # noqa: E402
from cpsl_trainer.metrics import ConfusionMatrix  # noqa: E402
from cpsl_trainer.model import DeepLabV2  # noqa: E402

NUM_CLASSES, CROP = 19, (64, 128)


def load_demo_data(root: Path) -> Dict[str, Tensor]:
    """The demo's synthetic scenes (written once under ``root``), as uint8 tensors in memory."""
    gta5, cityscapes = write_demo_datasets(Path(root), progress=False)

    def stacked(dataset, key: str) -> Tensor:
        return torch.stack([dataset[i][key] for i in range(len(dataset))])

    source, val = GTA5Dataset(gta5), CityscapesDataset(cityscapes, "val")
    target = CityscapesDataset(cityscapes, "train", with_labels=False)
    return {"source": stacked(source, "image"), "source_labels": stacked(source, "label"),
            "target": stacked(target, "image"), "val": stacked(val, "image"), "val_labels": stacked(val, "label")}


def build_model() -> DeepLabV2:
    """The demo's network (examples/configs/demo.yaml): a dilated ResNet-18, random weights."""
    config = load_config(EXAMPLES / "configs" / "demo.yaml")
    return DeepLabV2.from_config(config.model, NUM_CLASSES, config.model.pretrained)


def random_crops(images: Tensor, labels: Optional[Tensor], batch: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """``batch`` random crops (with random horizontal flips) of random images and of their labels
    (None: unlabelled, zeros): float in [0, 1], int64."""
    index = torch.randint(len(images), (batch,), generator=generator)
    height, width = images.shape[-2:]
    crops, crop_labels = [], []
    for i in index.tolist():
        top = int(torch.randint(height - CROP[0] + 1, (1,), generator=generator))
        left = int(torch.randint(width - CROP[1] + 1, (1,), generator=generator))
        image = images[i, :, top:top + CROP[0], left:left + CROP[1]]
        label = image[0] * 0 if labels is None else labels[i, top:top + CROP[0], left:left + CROP[1]]
        if torch.rand((), generator=generator) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        crops.append(image)
        crop_labels.append(label)
    return torch.stack(crops).float() / 255, torch.stack(crop_labels).long()


def upsampled(maps: Tensor, size=CROP) -> Tensor:
    """The network's stride-8 maps at the image size."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)


def warm_up(model: nn.Module, data: Dict[str, Tensor], iterations: int, seed: int, lr: float = 0.01) -> nn.Module:
    """Source-only training: the starting point of both self-training loops."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(iterations):
        images, labels = random_crops(data["source"], data["source_labels"], 4, generator)
        loss = F.cross_entropy(upsampled(model(images)["out"]), labels, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, data: Dict[str, Tensor]) -> float:
    """mIoU (in %) on the target val split, whole images."""
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(NUM_CLASSES)
    for images, labels in zip(data["val"].split(8), data["val_labels"].split(8)):
        logits = upsampled(model(images.float() / 255)["out"], tuple(images.shape[-2:]))
        matrix.update(logits.argmax(1), labels)
    model.train(was_training)
    return 100 * matrix.miou()
