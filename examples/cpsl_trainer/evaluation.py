"""Evaluation on the target val set (mIoU and per-class IoU), whole images or sliding windows."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .context import RunContext
from .metrics import ConfusionMatrix, iou_table
from .training import as_float_images, colour_png, resize


class Evaluator:
    """mIoU of a model on the target val set of a run's context."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    @torch.no_grad()
    def logits_of(self, model: nn.Module, image: Tensor) -> Tensor:
        """(1, K, H, W) logits at the image's size: whole image, or averaged sliding windows."""
        size = tuple(image.shape[-2:])
        # Stride-8 logits to the image with align_corners=True, as the official validate() upsamples
        # them; the sliding windows (no official counterpart) are upsampled alike.
        if self.context.config.eval.mode == "whole":
            with self.context.autocast():
                return resize(model(image)["out"].float(), size)
        window = [min(w, s) for w, s in zip(self.context.config.eval.window, size)]
        stride = [max(w * 2 // 3, 1) for w in window]
        total = torch.zeros(1, self.context.protocol.num_classes, *size, device=image.device)
        hits = torch.zeros(1, 1, *size, device=image.device)
        tops = sorted({min(t, size[0] - window[0]) for t in range(0, size[0], stride[0])})
        lefts = sorted({min(l, size[1] - window[1]) for l in range(0, size[1], stride[1])})
        for top in tops:
            for left in lefts:
                part = image[..., top:top + window[0], left:left + window[1]]
                with self.context.autocast():
                    probabilities = resize(model(part)["out"].float(), window).softmax(1)
                total[..., top:top + window[0], left:left + window[1]] += probabilities
                hits[..., top:top + window[0], left:left + window[1]] += 1
        return total / hits

    @torch.no_grad()
    def evaluate(self, model: nn.Module, name: str, save_images: bool = True,
                 step: Optional[Tuple[str, int]] = None) -> Dict[str, Any]:
        """mIoU of ``model`` on the target val set; prints the per-class table and, at a
        ``(stage, iteration)`` step, writes the mIoU to TensorBoard."""
        context = self.context
        config, protocol = context.config, context.protocol
        was_training = model.training
        model.eval()
        confusion = ConfusionMatrix(protocol.num_classes)
        input_size = tuple(config.data.target_size)
        for index in tqdm(range(len(context.target_val)), desc=f"evaluate {name}", disable=not config.train.progress,
                          leave=False):
            sample = context.target_val[index]
            image = as_float_images(sample["image"][None], context.device)
            label = sample["label"].long()
            # The image to the input size as an image (the official code resizes it with PIL on
            # loading), the full-resolution logits to the label's size likewise (the official
            # code has the label resized by PIL to the image instead): align_corners=False.
            if tuple(image.shape[-2:]) != input_size:
                image = resize(image, input_size, align_corners=False)
            logits = self.logits_of(model, image)
            prediction = resize(logits, tuple(label.shape), align_corners=False).argmax(1)[0].cpu()
            confusion.update(prediction, label)
            if save_images and index < config.eval.save_images:
                colour_png(context.output / "predictions" / name / f"{index:06d}.png", prediction, protocol)
        model.train(was_training)
        iou = confusion.iou()
        per_class = [None if v != v else round(100 * v, 2) for v in iou.tolist()]
        result = {"per_class_iou": dict(zip(protocol.class_names, per_class)), "mIoU": round(100 * confusion.miou(), 2)}
        for subset, positions in protocol.extra_subsets.items():
            result[subset] = round(100 * confusion.miou(positions), 2)
        tqdm.write(iou_table(protocol.class_names, iou, title=f"== {name}: target val IoU (%)"))
        if context.writer is not None and step is not None:
            context.writer.add_scalar(f"{step[0]}/mIoU", result["mIoU"], step[1])
        return result
