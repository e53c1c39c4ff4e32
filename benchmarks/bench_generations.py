"""The redesigned CUDA kernels against the ones before them, per op: which generation wins.

Until a GPU has timed both, the CUDA library carries two generations of kernels and
CPSL_OPS_CUDA_KERNELS (current | previous, read at each call) picks one
(csrc/include/cpsl_ops/kernel_generation.h). For every op at CPSL's size and at 16 times it, this
times both generations, checks that they agree (the same op, two summation orders: fp32
tolerances), and prints one line per op and size with the winner and each one's fraction of the
floor (the bytes the op must move, at the bandwidth of a copy measured in the run). Exit status 1
if two generations disagree.

    python benchmarks/bench_generations.py [--quick] [--json out.json] [--check-args] [--device cpu]

(--quick: CPSL's size only; on the CPU, which has one generation, it is a dry run of the script.)

benchmarks/gpu_suite.sh runs it in quick and full mode; once a GPU has chosen, the losers go.
"""

from __future__ import annotations

import os
import statistics
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

import torch

import cpsl_ops

try:
    from harness import Row, common_arguments, make_row, measure, parse_arguments, print_table, save, warmup_seconds
except ImportError:
    from benchmarks.harness import (Row, common_arguments, make_row, measure, parse_arguments, print_table, save,
                                    warmup_seconds)

GENERATIONS = ("current", "previous")
VARIABLE = "CPSL_OPS_CUDA_KERNELS"
SCALES = {"cpsl": 1, "16x": 16}  # batch multipliers of CPSL's sizes


@contextmanager
def generation(name: str) -> Iterator[None]:
    before = os.environ.get(VARIABLE)
    os.environ[VARIABLE] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ[VARIABLE]
        else:
            os.environ[VARIABLE] = before


@dataclass
class Case:
    op: str
    size: str
    gbytes: float  # what the op must move: its floor at the copy bandwidth
    run: Callable[[], torch.Tensor]  # one call, returning what the generations must agree on


def sinkhorn_case(scale: int, device: torch.device) -> Case:
    batch, samples, classes, iterations = 8 * scale, 65792, 19, 3
    generator = torch.Generator(device).manual_seed(0)
    scores = torch.randn(batch, samples, classes, generator=generator, device=device) * 12
    prior = torch.rand(batch, classes, generator=generator, device=device) + 0.1
    # T + 1 reads of the scores (a column pass per iteration, then the assignment pass) and one write.
    gbytes = (iterations + 2) * scores.numel() * scores.element_size() / 1e9
    return Case("balanced_sinkhorn", f"{batch}x{samples}x{classes} T={iterations}", gbytes,
                lambda: cpsl_ops.balanced_sinkhorn(scores, prior, num_iters=iterations))


def feature_maps(scale: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, str]:
    batch, dim, height, width, classes = 4 * scale, 256, 128, 224, 19
    generator = torch.Generator(device).manual_seed(0)
    features = torch.randn(batch, dim, height, width, generator=generator, device=device)
    prototypes = torch.randn(classes, dim, generator=generator, device=device)
    return features, prototypes, f"{batch}x{dim}x{height}x{width} K={classes}"


def similarity_cases(features: torch.Tensor, prototypes: torch.Tensor, size: str) -> List[Case]:
    device = features.device
    classes = prototypes.shape[0]
    feature_gb = features.numel() * features.element_size() / 1e9
    logits_gb = feature_gb * classes / features.shape[1]
    leaf = features.clone().requires_grad_()
    leaf_prototypes = prototypes.clone().requires_grad_()
    grad_logits = torch.randn(features.shape[0], classes, *features.shape[2:], device=device)

    def forward_backward() -> torch.Tensor:
        leaf.grad = leaf_prototypes.grad = None
        cpsl_ops.prototype_similarity(leaf, leaf_prototypes, 0.08).backward(grad_logits)
        assert leaf.grad is not None and leaf_prototypes.grad is not None
        return torch.cat([leaf.grad.flatten(), leaf_prototypes.grad.flatten()])

    return [
        Case("similarity forward", size, feature_gb + logits_gb,
             lambda: cpsl_ops.prototype_similarity(features, prototypes, 0.08)),
        # Forward (features in, logits out), backward (features and the logits' gradient in, the
        # features' gradient out).
        Case("similarity fwd+bwd", size, 3 * feature_gb + 2 * logits_gb, forward_backward),
    ]


def prototype_case(features: torch.Tensor, prototypes: torch.Tensor, size: str) -> Case:
    batch, _, height, width = features.shape
    device = features.device
    generator = torch.Generator(device).manual_seed(1)
    labels = torch.randint(0, prototypes.shape[0], (batch, height, width), generator=generator, device=device)
    labels[:, : height // 8] = 255
    target = prototypes.clone()

    def update() -> torch.Tensor:
        target.copy_(prototypes)
        return cpsl_ops.update_prototypes_(target, features, labels, 0.999).clone()

    gbytes = (features.numel() * features.element_size() + labels.numel() * labels.element_size()) / 1e9
    return Case("prototype update", size, gbytes, update)


def cases(scale: int, device: torch.device) -> List[Case]:
    features, prototypes, size = feature_maps(scale, device)  # read-only in every case: shared
    return [sinkhorn_case(scale, device), *similarity_cases(features, prototypes, size),
            prototype_case(features, prototypes, size)]


def copy_bandwidth(numel: int, device: torch.device, repeats: int, warmup_s: float) -> float:
    """GB/s of a copy of ``numel`` floats (the size of the features), counting read and write."""
    source = torch.empty(numel, device=device)
    target = torch.empty_like(source)
    copy_ms = statistics.median(measure(lambda: target.copy_(source), device, 2, repeats, warmup_s))
    return 2 * numel * source.element_size() / 1e9 / (copy_ms / 1e3)


def agree(a: torch.Tensor, b: torch.Tensor) -> Tuple[bool, float]:
    difference = (a.double() - b.double()).abs()
    scale = max(1.0, b.abs().max().item())
    return bool((difference <= 1e-5 * scale + 1e-4 * b.double().abs()).all()), difference.max().item()


def main() -> int:
    parser = common_arguments(__doc__.split("\n\n")[0])
    parser.set_defaults(device="cuda")
    args = parse_arguments(parser)
    device = torch.device(args.device)
    scales = {"cpsl": 1} if args.quick else SCALES
    if args.check_args:
        print(f"would time {', '.join(GENERATIONS)} on {device} at {', '.join(scales)}: balanced_sinkhorn, "
              "similarity forward, similarity fwd+bwd, prototype update")
        return 0
    if device.type == "cuda" and not cpsl_ops.build_info()["cuda_kernels"]:
        print("bench_generations: the CUDA kernels did not load", file=sys.stderr)
        return 1
    if device.type == "cpu":
        print("note: the CPU kernels have one generation: a dry run of this script")
    repeats = args.repeats or (5 if args.quick else 20)
    warmup_s = warmup_seconds(args)
    rows: List[Row] = []
    lines: List[str] = []
    disagreements = 0
    for scale in scales.values():
        problems = cases(scale, device)
        copy_gb_per_s = copy_bandwidth(4 * scale * 256 * 128 * 224, device, repeats, warmup_s)
        for case in problems:
            results: Dict[str, Row] = {}
            outputs: Dict[str, torch.Tensor] = {}
            for name in GENERATIONS:
                with generation(name):
                    outputs[name] = case.run().detach()
                    row = make_row(case.op, case.size, name, measure(case.run, device, 2, repeats, warmup_s),
                                   case.gbytes)
                row.floor_ms = case.gbytes / copy_gb_per_s * 1e3
                rows.append(row)
                results[name] = row
            same, largest = agree(outputs["current"], outputs["previous"])
            disagreements += not same
            current, previous = results["current"], results["previous"]
            winner = "current" if current.median_ms <= previous.median_ms else "previous"
            ratio = max(current.median_ms, previous.median_ms) / min(current.median_ms, previous.median_ms)
            lines.append(f"{case.op:<20} {case.size:<28} {winner} wins, {ratio:.2f}x; of floor: current "
                         f"{current.of_floor:.0%}, previous {previous.of_floor:.0%}; "
                         f"{'agree' if same else 'DISAGREE'} (max |difference| {largest:.2e})")
            del outputs
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print_table(rows, f"kernel generations on {where} (median of {repeats}; floors at the copy bandwidth measured "
                      "per size)")
    print()
    for line in lines:
        print(f"gpu_suite: {line}")
    save(rows, {"benchmark": "generations"}, device, args.json)
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
