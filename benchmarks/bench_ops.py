"""The other ops and a whole SelfLabelingLoss step: native kernels against the PyTorch reference.

Rows per op: native-<device>, reference-eager and reference-compiled (torch.compile of the same
reference function), plus the common hand-written alternatives where the issue names them
(``index_add_`` for the prototype update, ``torch.cdist`` for the euclidean similarity). Sizes are
CPSL's: similarity (both metrics) and rectification on the 4×256×128×224 student-resolution
features with 19 prototypes; the loss step on 4 EMA feature maps
of 256×65×113 (129×257 with --full) with the 65,536-row queue. Each row's floor is the bytes its
op must move (the GB/s column's) at the bandwidth of a copy of the features measured in the run.

    python benchmarks/bench_ops.py [--quick] [--device cuda] [--warmup-s S] [--json out.json] [--no-compile]
                                   [--check-args]
"""

from __future__ import annotations

import statistics
from typing import Callable, List

import torch

import cpsl_ops
from cpsl_ops import reference

try:
    from harness import (REFERENCE, Row, add_speedups, common_arguments, compile_reference, make_row, measure,
                         parse_arguments, print_table, save, warmup_seconds)
except ImportError:
    from benchmarks.harness import (REFERENCE, Row, add_speedups, common_arguments, compile_reference, make_row,
                                    measure, parse_arguments, print_table, save, warmup_seconds)


def index_add_update(prototypes, features, labels, momentum, ignore_index):
    """Class means with index_add_ over channel-last features: the usual hand-written alternative."""
    num_classes, dim = prototypes.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, dim)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    sums = prototypes.new_zeros(num_classes, dim).index_add_(0, flat_labels[valid], flat[valid])
    counts = torch.bincount(flat_labels[valid], minlength=num_classes)
    means = sums / counts.clamp_min(1)[:, None]
    return torch.where((counts > 0)[:, None], momentum * prototypes + (1 - momentum) * means, prototypes), counts


def compile_or_none(fn: Callable, enabled: bool) -> Callable | None:
    return torch.compile(fn) if enabled else None


def bench_case(rows: List[Row], op: str, size: str, gbytes: float, device: torch.device, repeats: int,
               warmup_s: float, implementations: dict) -> None:
    for impl, fn in implementations.items():
        if fn is not None:
            rows.append(make_row(op, size, impl, measure(fn, device, 2, repeats, warmup_s), gbytes))


def main() -> None:
    parser = common_arguments(__doc__)
    parser.add_argument("--full", action="store_true", help="the loss step at the full 129×257 EMA resolution")
    args = parse_arguments(parser)
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 10)
    warmup_s = warmup_seconds(args)
    native = f"native-{device.type}"
    compile_enabled = compile_reference(args, device)
    batch, dim, height, width, classes = (2, 256, 64, 112, 19) if args.quick else (4, 256, 128, 224, 19)
    size = f"{batch}x{dim}x{height}x{width} K={classes}"
    ema_height, ema_width = (129, 257) if args.full else (65, 113)
    queue = 8192 if args.quick else 65536
    if args.check_args:
        print(f"would time on {device}, reference-compiled {'on' if compile_enabled else 'off'}: the ops at {size}, "
              f"the loss step at {batch}x{dim}x{ema_height}x{ema_width} with a queue of {queue}")
        return
    rows: List[Row] = []
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, dim, height, width, generator=generator).to(device)
    prototypes = torch.randn(classes, dim, generator=generator).to(device)
    element = features.element_size()
    feature_gb = features.numel() * element / 1e9
    logits_gb = batch * classes * height * width * element / 1e9

    copy_target = torch.empty_like(features)
    copy_ms = statistics.median(measure(lambda: copy_target.copy_(features), device, 2, repeats, warmup_s))
    copy_gb_per_s = 2 * feature_gb / (copy_ms / 1e3)

    compiled_similarity = compile_or_none(reference.similarity, compile_enabled)
    bench_case(rows, "similarity forward", size, feature_gb + logits_gb, device, repeats, warmup_s, {
        native: lambda: cpsl_ops.prototype_similarity(features, prototypes, 0.08),
        REFERENCE: lambda: reference.similarity(features, prototypes, 0.08),
        "reference-compiled": (lambda: compiled_similarity(features, prototypes, 0.08)) if compiled_similarity else None,
    })

    leaf_features = features.clone().requires_grad_()
    leaf_prototypes = prototypes.clone().requires_grad_()
    grad_logits = torch.randn(batch, classes, height, width, generator=generator).to(device)

    def forward_backward(fn: Callable) -> Callable:
        def run():
            leaf_features.grad = leaf_prototypes.grad = None
            fn(leaf_features, leaf_prototypes, 0.08).backward(grad_logits)
        return run

    with_native = lambda f, c, t: cpsl_ops.prototype_similarity(f, c, t)  # noqa: E731
    bench_case(rows, "similarity fwd+bwd", size, 3 * feature_gb + 2 * logits_gb, device, repeats, warmup_s, {
        native: forward_backward(with_native),
        REFERENCE: forward_backward(reference.similarity),
        "reference-compiled": forward_backward(compiled_similarity) if compiled_similarity else None,
    })

    # The euclidean metric (ProDA, DiGA), against torch.cdist over channel-last pixels: the usual
    # hand-written form (its mm path, |f|^2 - 2<f, c> + |c|^2, on the CPU for this size).
    def cdist_logits(f: torch.Tensor, c: torch.Tensor, temperature: float) -> torch.Tensor:
        flat = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        return (-torch.cdist(flat, c) / temperature).view(f.shape[0], f.shape[2], f.shape[3], -1).permute(0, 3, 1, 2)

    euclidean = lambda f, c, t: cpsl_ops.prototype_similarity(f, c, t, "euclidean")  # noqa: E731
    euclidean_reference = lambda f, c, t: reference.similarity(f, c, t, "euclidean")  # noqa: E731
    compiled_euclidean = compile_or_none(euclidean_reference, compile_enabled)
    bench_case(rows, "euclidean forward", size, feature_gb + logits_gb, device, repeats, warmup_s, {
        native: lambda: euclidean(features, prototypes, 1.0),
        REFERENCE: lambda: euclidean_reference(features, prototypes, 1.0),
        "reference-compiled": (lambda: compiled_euclidean(features, prototypes, 1.0)) if compiled_euclidean else None,
        "cdist": lambda: cdist_logits(features, prototypes, 1.0),
    })
    bench_case(rows, "euclidean fwd+bwd", size, 3 * feature_gb + 2 * logits_gb, device, repeats, warmup_s, {
        native: forward_backward(euclidean),
        REFERENCE: forward_backward(euclidean_reference),
        "reference-compiled": forward_backward(compiled_euclidean) if compiled_euclidean else None,
        "cdist": forward_backward(cdist_logits),
    })

    labels = torch.randint(0, classes, (batch, height, width), generator=generator).to(device)
    labels[:, : height // 8] = 255
    target = prototypes.clone()
    compiled_update = compile_or_none(reference.update_prototypes, compile_enabled)
    bench_case(rows, "prototype update", size, feature_gb, device, repeats, warmup_s, {
        native: lambda: cpsl_ops.update_prototypes_(target, features, labels, 0.999),
        REFERENCE: lambda: reference.update_prototypes(prototypes, features, labels, 0.999, 255),
        "reference-compiled": (lambda: compiled_update(prototypes, features, labels, 0.999, 255))
        if compiled_update else None,
        "index_add_": lambda: index_add_update(prototypes, features, labels, 0.999, 255),
    })

    soft = torch.rand(batch, classes, height, width, generator=generator).to(device)
    compiled_rectify = compile_or_none(reference.rectify_pseudo_labels, compile_enabled)
    bench_case(rows, "rectification", f"{batch}x{classes}x{height}x{width}", 2 * logits_gb, device, repeats, warmup_s, {
        native: lambda: cpsl_ops.rectify_pseudo_labels(soft, grad_logits),
        REFERENCE: lambda: reference.rectify_pseudo_labels(soft, grad_logits, 0.0, 255),
        "reference-compiled": (lambda: compiled_rectify(soft, grad_logits, 0.0, 255)) if compiled_rectify else None,
    })

    ema_features = torch.randn(batch, dim, ema_height, ema_width, generator=generator).to(device)
    ema_logits = torch.randn(batch, classes, ema_height, ema_width, generator=generator).to(device)
    step_rows = {}
    for backend, impl in (("native", native), ("reference", REFERENCE)):
        if backend == "native" and not cpsl_ops.native_available():
            continue
        torch.manual_seed(0)
        criterion = cpsl_ops.SelfLabelingLoss(classes, dim, queue_size=queue).to(device)
        criterion.feature_queue.normal_()
        criterion.logit_queue.normal_()
        criterion.queue_len.fill_(queue)

        def step(criterion=criterion, backend=backend):
            with cpsl_ops.use_backend(backend):
                criterion.prototypes.grad = None
                criterion(ema_features, ema_logits).backward()
                criterion.update_ema()
        step_rows[impl] = step
    bench_case(rows, "SelfLabelingLoss step", f"{batch}x{dim}x{ema_height}x{ema_width} queue={queue}",
               queue * (dim + classes) * element / 1e9, device, repeats, warmup_s, step_rows)

    add_speedups(rows)
    for row in rows:
        row.floor_ms = row.gbytes / copy_gb_per_s * 1e3
    print_table(rows, f"cpsl_ops on {device} (median of repeats; floors at the copy bandwidth, "
                      f"{copy_gb_per_s:.1f} GB/s counting read and write)")
    save(rows, {"benchmark": "ops"}, device, args.json)


if __name__ == "__main__":
    main()
