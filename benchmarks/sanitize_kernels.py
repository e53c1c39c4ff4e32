"""Calls every CUDA kernel on small inputs and checks each result against the pure-PyTorch reference
(run in fp64 on the CPU), for compute-sanitizer (memcheck, racecheck, synccheck, initcheck):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py

A wrong result is an AssertionError (exit status 1), so a kernel that reads or writes the wrong
memory fails here even where the sanitizer does not see it. Covered, in fp32, fp16, bf16 and fp64:
the similarity forward and backward on channel-first, channels-last and flat features (the euclidean
metric on the first two); Sinkhorn in
every register layout (K = 19, 64, 100, 256) and the wide one (K = 300), on both launch paths on a
grid of two blocks, so that blocks walk several chunks of rows and every merge and barrier runs;
the prototype update on channel-first and channels-last features with ignored pixels; the
rectification. Then every op on B = 65,537 images of two pixels (past the 65,535 limit of a grid's
y and z dimensions); the early exits, which must raise ValueError and leave the next call right
(NaN scores and a bad prior on both launch paths, in both layouts; an out-of-range label); and a
CUDA graph of every op (narrow and wide Sinkhorn, fp32, fp16 and bf16) replayed on new inputs.
Graph capture needs PyTorch's caching allocator, so it is skipped under
PYTORCH_NO_CUDA_MEMORY_CACHING=1 (the memcheck run); the other three tools cover it.

    python benchmarks/sanitize_kernels.py --device cpu

runs the same checks on the CPU kernels (no launch paths, no graph): a try of this script on a
machine without a GPU (benchmarks/gpu_suite.sh rehearse).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch

import cpsl_ops

LAUNCH, MAX_BLOCKS = "CPSL_OPS_CUDA_SINKHORN_LAUNCH", "CPSL_OPS_CUDA_SINKHORN_MAX_BLOCKS"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Looser than the tests' (tests/conftest.py): a result from the wrong memory is off by far more.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def on_cpu_in_fp64(tensors) -> Iterator[torch.Tensor]:
    """The reference's inputs: in fp64, since its own fp32 sums are further off than the kernels' (a
    class sum over 131,074 pixels: 1e-3 of the largest gradient against 2e-5)."""
    return (t.cpu().double() if t.is_floating_point() else t.cpu() for t in tensors)


def compare(name: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    assert len(got) == len(want), name
    for index, (actual, expected) in enumerate(zip(got, want)):
        actual, label = actual.detach().cpu(), f"{name}, output {index}"
        assert actual.shape == expected.shape, f"{label}: shape {tuple(actual.shape)}, not {tuple(expected.shape)}"
        if actual.is_floating_point():
            tolerance = TOLERANCE[actual.dtype]
            scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
            torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance, atol=tolerance * scale,
                                       msg=lambda message: f"{label}: {message}")
        else:
            mismatches = int((actual != expected).sum())
            assert mismatches == 0, f"{label}: {mismatches} of {actual.numel()} differ"


def as_tuple(result) -> Tuple[torch.Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def check(name: str, function: Callable, *args: torch.Tensor) -> None:
    """``function(*args)`` on the native backend against the reference on fp64 CPU copies of ``args``."""
    with cpsl_ops.use_backend("native"):
        got = as_tuple(function(*args))
    with cpsl_ops.use_backend("reference"):
        want = as_tuple(function(*on_cpu_in_fp64(args)))
    compare(name, got, want)


def similarity(features: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.08, metric: str = "cosine"):
    """The logits and both gradients of their squares' sum."""
    features, prototypes = features.detach().requires_grad_(), prototypes.detach().requires_grad_()
    logits = cpsl_ops.prototype_similarity(features, prototypes, temperature, metric)
    logits.float().square().sum().backward()
    return logits.detach(), features.grad, prototypes.grad


# At τ = 1 (ProDA's), where the prototype gradients of the squared logits stay inside fp16.
euclidean_similarity = functools.partial(similarity, temperature=1.0, metric="euclidean")


def sinkhorn(scores: torch.Tensor, prior: torch.Tensor):
    return cpsl_ops.balanced_sinkhorn(scores, prior)


def update(prototypes: torch.Tensor, features: torch.Tensor, labels: torch.Tensor):
    """The updated prototypes (a copy) and the counts."""
    prototypes = prototypes.clone()
    counts = cpsl_ops.update_prototypes_(prototypes, features, labels, 0.9)
    return prototypes, counts


def untied(labels: torch.Tensor, soft: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Rectified labels on the CPU, -1 where the two largest products P_ST·softmax(logits) are within
    1e-4 of each other (relative), where either class may win by rounding."""
    product = soft.cpu().float() * logits.cpu().float().softmax(1)
    top = product.topk(2, dim=1).values
    return labels.cpu().masked_fill(top[:, 0] - top[:, 1] <= 1e-4 * top[:, 0], -1)


def rectify(soft: torch.Tensor, logits: torch.Tensor):
    labels, confidence = cpsl_ops.rectify_pseudo_labels(soft, logits)
    return untied(labels, soft, logits), confidence


@contextlib.contextmanager
def sinkhorn_launch(path: Optional[str]) -> Iterator[None]:
    """CUDA Sinkhorn calls on ``path`` (cooperative or per_pass) on a grid of two blocks; None: as set."""
    if path is None:
        yield
        return
    os.environ[LAUNCH], os.environ[MAX_BLOCKS] = path, "2"
    try:
        yield
    finally:
        del os.environ[LAUNCH], os.environ[MAX_BLOCKS]


def cases(device: torch.device, dtype: torch.dtype, batch: int = 2, height: int = 9, width: int = 13,
          classes: int = 19) -> Tuple[torch.Tensor, ...]:
    """Features (B, 32, H, W), prototypes, labels with ignored pixels, soft labels and logits."""
    features = torch.randn(batch, 32, height, width, device=device).to(dtype)
    prototypes = torch.randn(classes, 32, device=device).to(dtype)
    labels = torch.randint(0, classes, (batch, height, width), device=device)
    labels[:, 0] = 255
    soft = torch.rand(batch, classes, height, width, device=device).softmax(1).to(dtype)
    logits = (torch.randn(batch, classes, height, width, device=device) * 3).to(dtype)
    return features, prototypes, labels, soft, logits


def check_every_op(device: torch.device, dtype: torch.dtype, launches: Sequence[Optional[str]]) -> None:
    features, prototypes, labels, soft, logits = cases(device, dtype)
    channels_last = features.to(memory_format=torch.channels_last)
    check(f"similarity {dtype}", similarity, features, prototypes)
    check(f"similarity channels-last {dtype}", similarity, channels_last, prototypes)
    check(f"similarity flat {dtype}", similarity, features.permute(0, 2, 3, 1).reshape(-1, 32), prototypes)
    check(f"euclidean similarity {dtype}", euclidean_similarity, features, prototypes)
    check(f"euclidean similarity channels-last {dtype}", euclidean_similarity, channels_last, prototypes)
    for launch in launches:
        with sinkhorn_launch(launch):
            for classes in (19, 64, 100, 256, 300):
                scores = torch.rand(2, 2500, classes, device=device).to(dtype)
                check(f"sinkhorn K={classes} {launch} {dtype}", sinkhorn, scores,
                      torch.rand(classes, device=device) + 0.1)
    check(f"prototype update {dtype}", update, prototypes, features, labels)
    check(f"prototype update channels-last {dtype}", update, prototypes, channels_last, labels)
    check(f"rectify {dtype}", rectify, soft, logits)


def check_large_batches(device: torch.device, launches: Sequence[Optional[str]]) -> None:
    features, prototypes, labels, soft, logits = cases(device, torch.float32, batch=65_537, height=1, width=2,
                                                       classes=5)
    check("similarity B=65,537", similarity, features, prototypes)
    for launch in launches:
        with sinkhorn_launch(launch):
            check(f"sinkhorn B=65,537 {launch}", sinkhorn, torch.rand(65_537, 2, 5, device=device),
                  torch.rand(65_537, 5, device=device) + 0.1)
    check("prototype update B=65,537", update, prototypes, features, labels)
    check("rectify B=65,537", rectify, soft, logits)


def expect_value_error(name: str, function: Callable, *args: torch.Tensor) -> None:
    with cpsl_ops.use_backend("native"):
        try:
            function(*args)
        except ValueError:
            return
    raise AssertionError(f"{name}: no ValueError")


def check_early_exits(device: torch.device, launches: Sequence[Optional[str]]) -> None:
    """Bad values raise, and the call after each gives the right result (no flag or partial left)."""
    for launch in launches:
        with sinkhorn_launch(launch):
            for classes in (19, 300):
                scores = torch.rand(2, 2500, classes, device=device)
                prior = torch.rand(classes, device=device) + 0.1
                bad_scores = scores.clone()
                bad_scores[1, 2400, 3] = float("nan")  # in the last chunk of the last problem
                expect_value_error(f"NaN scores K={classes} {launch}", sinkhorn, bad_scores, prior)
                check(f"sinkhorn after NaN scores K={classes} {launch}", sinkhorn, scores, prior)
                expect_value_error(f"bad prior K={classes} {launch}", sinkhorn, scores, -prior)
                check(f"sinkhorn after a bad prior K={classes} {launch}", sinkhorn, scores, prior)
    features, prototypes, labels, _, _ = cases(device, torch.float32)
    bad_labels = labels.clone()
    bad_labels[1, 8, 12] = 19
    expect_value_error("out-of-range label", update, prototypes, features, bad_labels)
    check("prototype update after an out-of-range label", update, prototypes, features, labels)


def warm_up(function: Callable[[], object]) -> None:
    """``function()`` on a side stream, as PyTorch asks before a capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        function()
    torch.cuda.current_stream().wait_stream(side)


def check_graph_replay() -> None:
    """A CUDA graph of every op, replayed on new inputs, against the reference on those inputs."""
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        print("graph capture skipped: it needs the caching allocator")
        return
    device = torch.device("cuda")
    features, prototypes, labels, soft, logits = cases(device, torch.float32)
    inputs = (torch.rand(2, 2500, 19, device=device), torch.rand(2, 1100, 300, device=device).half(),
              torch.rand(2, 1100, 64, device=device).bfloat16(), features, prototypes, labels, soft, logits)

    def every_op(scores, wide_scores, bf16_scores, features, prototypes, labels, soft, logits):
        """Every op's outputs, rectify's labels as they are: untied copies to the CPU, which a capture forbids."""
        return (sinkhorn(scores, None), sinkhorn(wide_scores, None), sinkhorn(bf16_scores, None),
                *similarity(features, prototypes), *update(prototypes, features, labels),
                *cpsl_ops.rectify_pseudo_labels(soft, logits))

    with cpsl_ops.use_backend("native"):
        warm_up(lambda: every_op(*inputs))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = every_op(*inputs)
    for tensor in inputs:
        if tensor.is_floating_point():
            tensor.copy_(torch.rand_like(tensor))
    graph.replay()
    torch.cuda.synchronize()
    with cpsl_ops.use_backend("reference"):
        expected = every_op(*on_cpu_in_fp64(inputs))
    soft, logits = inputs[-2:]
    compare("graph replay", (*outputs[:-2], untied(outputs[-2], soft, logits), outputs[-1]),
            (*expected[:-2], untied(expected[-2], soft, logits), expected[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    device = torch.device(parser.parse_args().device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (--device cpu runs these checks on the CPU kernels)")
    torch.manual_seed(0)
    launches = ("cooperative", "per_pass") if device.type == "cuda" else (None,)
    for dtype in DTYPES:
        check_every_op(device, dtype, launches)
    check_large_batches(device, launches)
    check_early_exits(device, launches)
    if device.type == "cuda":
        check_graph_replay()
        torch.cuda.synchronize()
    print(f"every kernel ran on {device} and matched the reference")


if __name__ == "__main__":
    main()
