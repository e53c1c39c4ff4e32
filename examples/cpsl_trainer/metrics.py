"""Confusion-matrix mIoU, as the Cityscapes benchmark and the CPSL/ProDA code compute it."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .labels import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a K × K confusion matrix (rows: ground truth, columns: prediction) over batches.

    Pixels whose ground truth is ``ignore_index`` are skipped; a prediction outside [0, K) is an
    error, as is a ground-truth label outside [0, K) that is not ``ignore_index``.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predictions: Tensor, targets: Tensor) -> None:
        if predictions.shape != targets.shape:
            raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ")
        targets = targets.reshape(-1).long().cpu()
        predictions = predictions.reshape(-1).long().cpu()
        valid = targets != self.ignore_index
        targets, predictions = targets[valid], predictions[valid]
        for name, values in (("targets", targets), ("predictions", predictions)):
            if values.numel() and (int(values.min()) < 0 or int(values.max()) >= self.num_classes):
                raise ValueError(f"{name} must lie in [0, {self.num_classes}) (or equal ignore_index for targets)")
        index = targets * self.num_classes + predictions
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    def iou(self) -> Tensor:
        """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from both."""
        matrix = self.matrix.double()
        true_positive = matrix.diag()
        union = matrix.sum(0) + matrix.sum(1) - true_positive
        return torch.where(union > 0, true_positive / union.clamp_min(1), torch.full_like(union, float("nan")))

    def miou(self, classes: Optional[Sequence[int]] = None) -> float:
        """Mean IoU over the classes present in the ground truth or predictions (or over ``classes``)."""
        iou = self.iou() if classes is None else self.iou()[list(classes)]
        return float(iou.nanmean())


def iou_table(names: Sequence[str], iou: Tensor, title: str = "") -> str:
    """A plain-text table of per-class IoU (in %) and the mIoU."""
    width = max(len(name) for name in names)
    lines: List[str] = [title] if title else []
    for name, value in zip(names, iou.tolist()):
        lines.append(f"{name:<{width}}  {'   n/a' if value != value else f'{100 * value:6.2f}'}")
    lines.append(f"{'mIoU':<{width}}  {100 * float(iou.nanmean()):6.2f}")
    return "\n".join(lines)
