"""A DAFormer-style self-training loop (EMA teacher, ClassMix, confidence-weighted pseudo labels)
on the demo's synthetic GTA5 -> Cityscapes scenes; ``--cpsl`` adds CPSL through the public
cpsl_ops API. Every line that CPSL adds is marked ``# CPSL``.

    python examples/plugin/self_training.py            # the baseline loop
    python examples/plugin/self_training.py --cpsl     # the same loop with CPSL
    python examples/plugin/self_training.py --both     # both, from one warm-up
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpsl_ops import SelfLabelingLoss, class_distribution, rectify_pseudo_labels, update_prototypes_

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_setup.py lies next to this file
from demo_setup import (  # noqa: E402
    IGNORE_INDEX, NUM_CLASSES, build_model, evaluate, load_demo_data, random_crops, upsampled, warm_up,
)


class EMATeacher:
    """A frozen copy of the student whose weights (and BatchNorm statistics) follow it by EMA."""

    def __init__(self, student: nn.Module, momentum: float) -> None:
        self.network, self.momentum = copy.deepcopy(student).eval().requires_grad_(False), momentum

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for ema, value in zip(self.network.state_dict().values(), student.state_dict().values()):
            ema.lerp_(value, 1 - self.momentum) if ema.is_floating_point() else ema.copy_(value)


def classmix(source: Tensor, source_labels: Tensor, target: Tensor, target_labels: Tensor,
             generator: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
    """Pastes half of each source image's classes onto the target image; the labels alike.
    Returns the mixed images, the mixed labels and the (B, H, W) mask of pasted pixels."""
    masks = []
    for labels in source_labels:
        classes = labels.unique()
        classes = classes[classes != IGNORE_INDEX]
        chosen = classes[torch.randperm(len(classes), generator=generator)[:(len(classes) + 1) // 2]]
        masks.append(torch.isin(labels, chosen))
    mask = torch.stack(masks)
    return torch.where(mask[:, None], source, target), torch.where(mask, source_labels, target_labels), mask


def confidence_weight(max_probabilities: Tensor, threshold: float) -> Tensor:
    """DAFormer's pseudo-label weight: the share of target pixels the teacher is confident about."""
    return (max_probabilities > threshold).float().mean()


@torch.no_grad()
def cpsl_from_warmup(model: nn.Module, target: Tensor) -> SelfLabelingLoss:  # CPSL
    """CPSL's start: the class prior and the prototypes (class means of the features) from the
    warm-up model's predictions on the target train set."""
    outputs = [model.eval()(images.float() / 255) for images in target.split(16)]
    features, labels = torch.cat([o["feat"] for o in outputs]), torch.cat([o["out"] for o in outputs]).argmax(1)
    means = torch.zeros(NUM_CLASSES, features.shape[1])
    update_prototypes_(means, features, labels, momentum=0.0)
    prior = class_distribution(labels, NUM_CLASSES).clamp_min(1e-4)
    self_labeling = SelfLabelingLoss(NUM_CLASSES, features.shape[1], class_prior=prior, queue_size=2048,
                                     samples_per_image=64, ema_momentum=0.99)
    self_labeling.init_prototypes(means)
    return self_labeling


def self_train(student: nn.Module, data: Dict[str, Tensor], iterations: int, seed: int, cpsl: bool = False,
               lr: float = 0.01, threshold: float = 0.968, ema: float = 0.99, sl_weight: float = 0.1,
               log_every: int = 0, eval_every: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    teacher = EMATeacher(student, ema)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    if cpsl:
        self_labeling = cpsl_from_warmup(teacher.network, data["target"])  # CPSL
        optimizer.add_param_group({"params": [self_labeling.prototypes], "weight_decay": 0.0})  # CPSL
    # DAFormer's schedule: the learning rate decays linearly to 0, so the last student is annealed
    # rather than one noisy SGD iterate (whose target mIoU swung by up to 20 within 40 iterations here).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / iterations)
    student.train()
    for iteration in range(1, iterations + 1):
        source, source_labels = random_crops(data["source"], data["source_labels"], 4, generator)
        target, _ = random_crops(data["target"], None, 4, generator)
        with torch.no_grad():
            teacher_out = teacher.network(target)
            probabilities = upsampled(teacher_out["out"]).softmax(1)
            max_probabilities, pseudo_labels = probabilities.max(1)
            if cpsl:  # CPSL: the teacher's labels rectified by the EMA prototypes' posterior
                prototype_logits = upsampled(self_labeling.prototype_logits(teacher_out["feat"]))  # CPSL
                pseudo_labels, _ = rectify_pseudo_labels(probabilities, prototype_logits)  # CPSL
            weight = confidence_weight(max_probabilities, threshold)
            mixed, mixed_labels, pasted = classmix(source, source_labels, target, pseudo_labels, generator)
            pixel_weights = torch.where(pasted, 1.0, weight)

        loss_source = F.cross_entropy(upsampled(student(source)["out"]), source_labels, ignore_index=IGNORE_INDEX)
        mixed_out = student(mixed)
        loss_mixed = (F.cross_entropy(upsampled(mixed_out["out"]), mixed_labels, reduction="none",
                                      ignore_index=IGNORE_INDEX) * pixel_weights).mean()
        loss = loss_source + loss_mixed
        if cpsl:  # CPSL: class-balanced self-labeling of the student's features (Sinkhorn targets, class prior)
            loss = loss + sl_weight * self_labeling(mixed_out["feat"])  # CPSL
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        teacher.update(student)
        if cpsl:
            self_labeling.update_ema()  # CPSL: the EMA prototypes follow the learnt ones
        if log_every and iteration % log_every == 0:
            print(f"{'cpsl' if cpsl else 'base'} {iteration:4d}/{iterations}  source {loss_source.item():.3f}  "
                  f"mixed {loss_mixed.item():.3f}  weight {weight.item():.3f}", flush=True)
        if eval_every and iteration % eval_every == 0:
            print(f"{'cpsl' if cpsl else 'base'} {iteration:4d}/{iterations}  target val mIoU {evaluate(student, data):.2f}",
                  flush=True)
    return student


def warm_model(data: Dict[str, Tensor], iterations: int, seed: int, weights: Optional[Path] = None) -> nn.Module:
    """The source-only model both loops start from: read from ``weights`` when that file exists
    (e.g. the demo trainer's runs/demo/checkpoints/warmup.pt), else trained and saved there."""
    torch.manual_seed(seed)
    model = build_model()
    if weights is not None and weights.exists():
        model.load_state_dict(torch.load(weights))
        return model
    warm_up(model, data, iterations, seed)
    if weights is not None:
        torch.save(model.state_dict(), weights)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpsl", action="store_true", help="add CPSL to the loop")
    parser.add_argument("--both", action="store_true", help="run the baseline loop, then the CPSL one")
    parser.add_argument("--data", type=Path, default=Path("runs/plugin/demo_data"))
    parser.add_argument("--warmup-iterations", type=int, default=400)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-weights", type=Path, default=None,
                        help="start from these source-only weights if the file exists, else save the warm-up there")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_demo_data(args.data)
    warm = warm_model(data, args.warmup_iterations, args.seed, args.warmup_weights)
    print(f"source-only warm-up: target val mIoU {evaluate(warm, data):.2f}  ({time.perf_counter() - start:.0f}s)")
    for cpsl in ([False, True] if args.both else [args.cpsl]):
        begin = time.perf_counter()
        model = self_train(copy.deepcopy(warm), data, args.iterations, args.seed, cpsl=cpsl, log_every=50,
                           eval_every=args.eval_every)
        print(f"{'with CPSL' if cpsl else 'baseline '}: target val mIoU {evaluate(model, data):.2f}  "
              f"({time.perf_counter() - begin:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
