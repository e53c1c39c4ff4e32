"""A minimal, self-contained use of cpsl-ops on synthetic data (runs in seconds on a laptop CPU).

Pixel features are drawn around 19 class centres with a long-tailed class frequency, like
Cityscapes. A SelfLabelingLoss learns prototypes from them with balanced Sinkhorn targets and a
memory bank; the EMA prototypes then rectify noisy soft pseudo labels. It prints the loss, the
clustering accuracy of the prototypes and how much rectification improves the pseudo labels.

    python examples/quickstart.py [--steps 150] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import cpsl_ops
from cpsl_ops import SelfLabelingLoss, class_distribution, rectify_pseudo_labels, update_prototypes_

NUM_CLASSES, FEAT_DIM = 19, 256
NOISE = 0.15  # per-channel feature noise: |noise| ≈ 2.4 × |centre|


def make_batch(centers: torch.Tensor, frequencies: torch.Tensor, batch: int, size: int, noise: float,
               generator: torch.Generator):
    """(B, D, H, W) features around the class centres, and their (B, H, W) true classes."""
    labels = torch.multinomial(frequencies, batch * size * size, replacement=True, generator=generator)
    features = centers[labels] + noise * torch.randn(labels.numel(), centers.shape[1], generator=generator)
    return features.view(batch, size, size, -1).permute(0, 3, 1, 2), labels.view(batch, size, size)


def noisy_soft_labels(labels: torch.Tensor, flip: float, generator: torch.Generator) -> torch.Tensor:
    """Soft pseudo labels that favour a wrong class on a ``flip`` share of pixels, as a warm-up model's do."""
    wrong = torch.randint(0, NUM_CLASSES, labels.shape, generator=generator)
    flipped = torch.rand(labels.shape, generator=generator) < flip
    favourite = torch.where(flipped, wrong, labels)
    logits = 2.0 * F.one_hot(favourite, NUM_CLASSES) + 1.2 * F.one_hot(labels, NUM_CLASSES)
    logits = logits + 0.5 * torch.randn(logits.shape, generator=generator)
    return logits.float().softmax(-1).permute(0, 3, 1, 2)


def cluster_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"cpsl-ops {cpsl_ops.__version__}: {cpsl_ops.build_info()}")

    centers = F.normalize(torch.randn(NUM_CLASSES, FEAT_DIM, generator=generator), dim=1)
    frequencies = torch.linspace(1.0, 0.05, NUM_CLASSES) ** 2
    frequencies /= frequencies.sum()

    # CPSL's prior is the class histogram of the warm-up model's predictions on the target set.
    _, warmup_labels = make_batch(centers, frequencies, 8, 32, 0.0, generator)
    prior = class_distribution(warmup_labels, NUM_CLASSES).clamp_min(1e-4)
    criterion = SelfLabelingLoss(NUM_CLASSES, FEAT_DIM, class_prior=prior, queue_size=8192, samples_per_image=256)

    # CPSL starts from class means of the warm-up model's features: take them from one noisy batch.
    features, labels = make_batch(centers, frequencies, 4, 32, NOISE, generator)
    means = torch.zeros(NUM_CLASSES, FEAT_DIM)
    update_prototypes_(means, features, labels, momentum=0.0)
    criterion.init_prototypes(means + 0.12 * torch.randn(NUM_CLASSES, FEAT_DIM, generator=generator))
    optimizer = torch.optim.SGD([criterion.prototypes], lr=0.05, momentum=0.9)

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        features, labels = make_batch(centers, frequencies, 4, 32, NOISE, generator)
        loss = criterion(features)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        criterion.update_ema()
        if step == 1 or step % 25 == 0 or step == args.steps:
            accuracy = cluster_accuracy(criterion.prototype_logits(features, ema=False), labels)
            print(f"step {step:4d}/{args.steps}  loss {loss.item():.4f}  prototype accuracy {accuracy:.3f}  "
                  f"queue {int(criterion.queue_len)}/{criterion.queue_size}  {time.perf_counter() - start:.1f}s")

    features, labels = make_batch(centers, frequencies, 4, 64, NOISE, generator)
    soft = noisy_soft_labels(labels, flip=0.3, generator=generator)
    rectified, confidence = criterion.rectify(soft, features)
    before = (soft.argmax(1) == labels).float().mean().item()
    after = (rectified == labels).float().mean().item()
    print(f"pseudo-label accuracy: soft labels {before:.3f} -> rectified {after:.3f} "
          f"(mean confidence {confidence.mean().item():.3f})")
    # The same rectification, from the functional API:
    same, _ = rectify_pseudo_labels(soft, criterion.prototype_logits(features))
    assert torch.equal(same, rectified)


if __name__ == "__main__":
    main()
