"""Every CUDA kernel of every op, run under the GPU simulator and compared with the fp64 reference.

``bash tests/gpusim/run.sh`` builds the simulator and ``sim_ops`` (the ops' own launch code over
the kernels) and then runs this script, which writes one request folder per problem, runs them
under the simulator (a few runner processes in parallel), and checks each result against
``cpsl_ops.reference`` evaluated in fp64 at the CPU tests' tolerances (tests/conftest.py), or, for
bad inputs, that the kernels raise the flag behind the op's error exactly where the reference
raises. Every check runs on both kernel generations (CPSL_OPS_CUDA_KERNELS: current, and previous,
tagged ``[previous]``) until a GPU has chosen between them. It prints one line per check and last
``gpusim: N/M kernel checks pass``; it exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TOLERANCES  # noqa: E402  (the CPU tests' tolerances)

from cpsl_ops import reference  # noqa: E402

DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
               torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8"}
# Device flags of each op (csrc/cuda/*_kernels.cuh): what the op turns into its ValueError.
SINKHORN_BAD_PRIOR, SINKHORN_NON_FINITE, SINKHORN_SPREAD = 0, 1, 2
PROTOTYPE_BAD_LABEL, PROTOTYPE_NON_FINITE = 0, 1


@dataclass
class Output:
    dtype: torch.dtype
    shape: Tuple[int, ...]
    view: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # the kernel's (B, C, P) view of it


@dataclass
class Request:
    """One op launch: its inputs (views whose whole storage is sent), numbers and outputs."""

    op: str
    dtype: torch.dtype
    inputs: Dict[str, torch.Tensor]
    numbers: Dict[str, object]
    outputs: Dict[str, Output]
    folder: Path = Path()
    results: Dict[str, torch.Tensor] = field(default_factory=dict)
    flags: List[int] = field(default_factory=list)
    error: str = ""

    def write(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        lines = [f"op {self.op}", f"dtype {DTYPE_NAMES[self.dtype]}"]
        lines += [f"{key} {value}" for key, value in self.numbers.items()]
        for name, view in self.inputs.items():
            storage = torch.as_strided(view, (view.untyped_storage().nbytes() // view.element_size(),), (1,), 0)
            (folder / f"{name}.bin").write_bytes(storage.contiguous().numpy().tobytes())
            lines.append(f"{name} {view.storage_offset()} {' '.join(map(str, view.stride()))}")
        for name, out in self.outputs.items():
            lines.append(f"{name}_numel {math.prod(out.shape)}")
            if out.view is not None:
                lines.append(f"{name} 0 {' '.join(map(str, out.view(torch.empty(out.shape)).stride()))}")
        (folder / "request.txt").write_text("\n".join(lines) + "\n")

    def elements(self) -> int:
        return sum(view.numel() for view in self.inputs.values())

    def read(self) -> None:
        if (self.folder / "error.txt").exists():
            self.error = (self.folder / "error.txt").read_text()
            return
        if not (self.folder / "flags.txt").exists():
            self.error = "no result (the simulator stopped before this request)"
            return
        self.flags = [int(v) for v in (self.folder / "flags.txt").read_text().split()]
        for name, out in self.outputs.items():
            data = bytearray((self.folder / f"{name}.bin").read_bytes())
            self.results[name] = torch.frombuffer(data, dtype=out.dtype).reshape(out.shape)


@dataclass
class Check:
    name: str
    requests: List[Request]
    verify: Callable[[List[Request]], None]  # raises AssertionError on a mismatch


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """The CPU tests' tolerance for ``dtype``, its absolute part scaled to the values' size."""
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale, equal_nan=False)


def random(shape: Sequence[int], seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * scale


# ---- balanced_sinkhorn ----

def sinkhorn_request(scores: torch.Tensor, prior: torch.Tensor, max_blocks: Optional[int] = None,
                     epsilon: float = 0.05, num_iters: int = 3) -> Request:
    """One Sinkhorn call on the per-pass path (the simulator cannot run the cooperative launch)."""
    batch, samples, classes = scores.shape
    numbers = {"prior_dtype": DTYPE_NAMES[prior.dtype], "batch": batch, "samples": samples, "classes": classes,
               "epsilon": repr(epsilon), "num_iters": num_iters}
    if max_blocks is not None:
        numbers["max_blocks"] = max_blocks
    return Request("sinkhorn", scores.dtype, {"scores": scores, "prior": prior}, numbers,
                   {"assignment": Output(scores.dtype, (batch, samples, classes))})


def sinkhorn_problem(dtype: torch.dtype, batch: int, samples: int, classes: int, seed: int,
                     padded_rows: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores of CPSL's size of logits (cos/τ), optionally with rows padded apart (a row stride > K)."""
    width = classes + 3 if padded_rows else classes
    scores = random((batch, samples, width), seed, scale=2.0).to(dtype)[:, :, :classes]
    prior = random((batch, classes), seed + 1).exp().to(torch.float32)
    return scores, prior


def expect_sinkhorn(scores: torch.Tensor, prior: torch.Tensor, epsilon: float = 0.05, num_iters: int = 3):
    """The fp64 reference's answer or, where the reference raises in the scores' own dtype, the flags
    behind that ValueError."""
    def verify(requests: List[Request]) -> None:
        try:
            reference.balanced_sinkhorn(scores, prior, epsilon, num_iters)
        except ValueError as error:
            wanted = {SINKHORN_BAD_PRIOR} if "class_prior" in str(error) else {SINKHORN_NON_FINITE, SINKHORN_SPREAD}
            for request in requests:
                raised = {i for i, flag in enumerate(request.flags) if flag}
                assert raised and raised <= wanted, f"flags {request.flags}, reference: {error}"
            return
        expected = reference.balanced_sinkhorn(scores.double(), prior.double(), epsilon, num_iters)
        for request in requests:
            assert not any(request.flags), f"flags {request.flags} on valid input"
            close(request.results["assignment"], expected, scores.dtype)
        bits_equal(requests, "assignment")
    return verify


def bits_equal(requests: List[Request], output: str) -> None:
    """The output is the same, bit for bit, from every launch of the check."""
    first = requests[0].results[output].contiguous().view(torch.uint8)
    for other in requests[1:]:
        assert torch.equal(first, other.results[output].contiguous().view(torch.uint8)), (
            f"{output} differs between launches ({requests[0].numbers} vs {other.numbers})")


def sinkhorn_checks() -> List[Check]:
    """Every register layout: the current row kernel's (K = 1, 19, 32) and, past it, the previous
    warp-per-row ones (K = 33, 64 | 100 | 256) and the wide one (300), with one chunk of rows and
    two (N > 1,024), capped grids, the row kernel's edge cases and the error flags. The wide layout
    is the simulator's slowest (one thread per class walks every row): its problems are kept small."""
    checks = []
    for seed, classes in enumerate([1, 19, 64, 100, 256, 300, 32, 33]):
        cases = [(torch.float32, 300), (torch.float64, 300)]
        # Two chunks in fp32 for K = 19 and 300 are the full grids of the capped-grid checks below.
        if classes == 19:
            cases.append((torch.float64, 1030))
        elif classes != 300:
            cases.append((torch.float32, 1030))
        for dtype, samples in cases:
            scores, prior = sinkhorn_problem(dtype, 1, samples, classes, seed)
            chunks = "one chunk" if samples <= 1024 else "two chunks"
            checks.append(Check(f"sinkhorn K={classes} {DTYPE_NAMES[dtype]} N={samples} ({chunks})",
                                [sinkhorn_request(scores, prior)], expect_sinkhorn(scores, prior)))
    # Blocks that walk several chunks and problems (a capped grid), with rows padded apart: the
    # same bits as the full grid.
    for classes, batch, grids in ((19, 2, (None, 1, 3)), (300, 1, (None, 1))):
        scores, prior = sinkhorn_problem(torch.float32, batch, 1030, classes, 11, padded_rows=True)
        requests = [sinkhorn_request(scores, prior, max_blocks=grid) for grid in grids]
        grid_names = ", ".join("full" if grid is None else str(grid) for grid in grids)
        checks.append(Check(f"sinkhorn K={classes} B={batch} N=1030 padded rows: grids of {grid_names} blocks bit for bit",
                            requests, expect_sinkhorn(scores, prior)))
    scores, prior = sinkhorn_problem(torch.float16, 2, 600, 19, 13)
    checks.append(Check("sinkhorn K=19 float16", [sinkhorn_request(scores, prior)], expect_sinkhorn(scores, prior)))
    # The row kernel's edges: fewer rows than a warp, a warp's last group part full (300 = 256 + 32
    # + 12 rows), each register bound (K = 8, 16, 24) at its top with padded rows, in 16 bits; and
    # repeated launches, bit for bit.
    for classes, dtype, batch, samples, padded in ((19, torch.float32, 3, 5, False), (8, torch.float32, 2, 300, True),
                                                  (16, torch.float16, 1, 77, True), (24, torch.float64, 2, 300, True)):
        scores, prior = sinkhorn_problem(dtype, batch, samples, classes, 20 + classes, padded_rows=padded)
        layout = " padded rows" if padded else ""
        checks.append(Check(f"sinkhorn K={classes} {DTYPE_NAMES[dtype]} B={batch} N={samples}{layout}",
                            [sinkhorn_request(scores, prior)], expect_sinkhorn(scores, prior)))
    scores, prior = sinkhorn_problem(torch.float32, 1, 1030, 19, 16)
    checks.append(Check("sinkhorn K=19 N=1030: repeated launches bit for bit",
                        [sinkhorn_request(scores, prior, max_blocks=2) for _ in range(2)],
                        expect_sinkhorn(scores, prior)))
    scores, prior = sinkhorn_problem(torch.float32, 1, 300, 19, 14)
    checks.append(Check("sinkhorn eps=0.01 T=5 float32", [sinkhorn_request(scores, prior, epsilon=0.01, num_iters=5)],
                        expect_sinkhorn(scores, prior, 0.01, 5)))
    # Error flags, each where the reference raises, in both layouts; the bad value in the second
    # problem, in a chunk of its own.
    for classes in (19, 300):
        scores, prior = sinkhorn_problem(torch.float32, 2, 1030 if classes < 32 else 200, classes, 15)
        nan_scores = scores.clone()
        nan_scores[1, -1, classes - 1] = math.nan
        checks.append(Check(f"sinkhorn K={classes} NaN score raises", [sinkhorn_request(nan_scores, prior)],
                            expect_sinkhorn(nan_scores, prior)))
        bad_prior = prior.clone()
        bad_prior[1, 0] = 0.0
        checks.append(Check(f"sinkhorn K={classes} zero prior raises", [sinkhorn_request(scores, bad_prior)],
                            expect_sinkhorn(scores, bad_prior)))
        spread = scores.clone()
        spread[1, 3, 0], spread[1, 4, 0] = 3e38, -3e38
        checks.append(Check(f"sinkhorn K={classes} finite scores that overflow (S - max)/eps raise",
                            [sinkhorn_request(spread, prior)], expect_sinkhorn(spread, prior)))
    return checks


# ---- similarity and its backward ----

def as_batch_channel_pixel(t: torch.Tensor) -> torch.Tensor:
    """The kernels' (B, C, P) view of (N, C) or (B, C, H, W) (csrc/include/cpsl_ops/layout.h)."""
    return t.t().unsqueeze(0) if t.dim() == 2 else t.reshape(t.shape[0], t.shape[1], -1)


def similarity_features(layout: str, dtype: torch.dtype, batch: int, channels: int, height: int, width: int,
                        seed: int) -> torch.Tensor:
    if layout == "flat":
        return random((batch * height * width, channels), seed).to(dtype)
    features = random((batch, channels, height, width), seed).to(dtype)
    return features.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else features


def logits_shape(features: torch.Tensor, classes: int) -> Tuple[int, ...]:
    return (features.shape[0], classes) if features.dim() == 2 else (features.shape[0], classes, *features.shape[2:])


def similarity_requests(features: torch.Tensor, prototypes: torch.Tensor, grad_logits: torch.Tensor,
                        temperature: float, metric: str = "cosine") -> List[Request]:
    view = as_batch_channel_pixel(features)
    numbers = {"batch": view.shape[0], "channels": view.shape[1], "pixels": view.shape[2],
               "classes": prototypes.shape[0], "temperature": repr(temperature), "metric": metric}
    inputs = {"features": view, "prototypes": prototypes}
    forward = Request("similarity_forward", features.dtype, inputs, numbers,
                      {"logits": Output(features.dtype, tuple(grad_logits.shape), as_batch_channel_pixel)})
    backward = Request("similarity_backward", features.dtype, {**inputs, "grad_logits": as_batch_channel_pixel(grad_logits)},
                       numbers, {"grad_features": Output(features.dtype, tuple(features.shape), as_batch_channel_pixel),
                                 "grad_prototypes": Output(features.dtype, tuple(prototypes.shape))})
    return [forward, backward]


def expect_similarity(features: torch.Tensor, prototypes: torch.Tensor, grad_logits: torch.Tensor,
                      temperature: float, feature_scale: float | torch.Tensor = 1.0,
                      prototype_scale: float | torch.Tensor = 1.0, metric: str = "cosine"):
    """The fp64 reference on the inputs divided by the (per-row) scales: cosines are scale-invariant,
    and the gradients, compared after multiplying them by the scales, are 1/scale times theirs."""
    def verify(requests: List[Request]) -> None:
        forward, backward = requests
        f = (features.double() / feature_scale).requires_grad_()
        c = (prototypes.double() / prototype_scale).requires_grad_()
        logits = reference.similarity(f, c, temperature, metric)
        logits.backward(grad_logits.double())
        close(forward.results["logits"], logits.detach(), features.dtype)
        for name, grad, scale in (("grad_features", f.grad, feature_scale), ("grad_prototypes", c.grad, prototype_scale)):
            assert torch.isfinite(backward.results[name]).all(), f"{name} not finite"
            close(backward.results[name].double() * scale, grad, features.dtype)
    return verify


def similarity_checks() -> List[Check]:
    checks = []
    cases = [("channels_first", torch.float32, 2, 24, 5, 7, 19), ("channels_last", torch.float32, 2, 24, 5, 7, 19),
             ("flat", torch.float32, 1, 24, 6, 5, 19), ("channels_first", torch.float64, 1, 16, 4, 9, 40),
             ("flat", torch.float64, 1, 20, 3, 7, 70), ("channels_last", torch.float16, 2, 16, 4, 5, 19)]
    # The edges of the current kernels' tiles (csrc/cuda/similarity_kernels.cuh: 256-pixel tiles
    # walked 16 channels at a time, register widths 8 | 20 | 32 classes, prototype-gradient chunks of
    # 512 pixels and blocks of 256 channels): tiles that end mid-image and a last partial tile and
    # chunk with D not a multiple of 16; fewer pixels than a block; K = 1, 32 (the register bound)
    # and 33 (above it: the previous kernels); fp16 flat features; two channel blocks; three chunks.
    cases += [("channels_first", torch.float32, 2, 37, 10, 30, 19), ("channels_first", torch.float32, 1, 16, 3, 5, 1),
              ("flat", torch.float32, 1, 24, 1, 7, 5), ("channels_last", torch.float32, 1, 20, 4, 5, 32),
              ("flat", torch.float32, 1, 12, 5, 5, 33), ("flat", torch.float16, 1, 40, 6, 10, 8),
              ("channels_first", torch.float32, 1, 260, 2, 10, 3), ("flat", torch.float64, 1, 8, 30, 40, 19)]
    for seed, (layout, dtype, batch, channels, height, width, classes) in enumerate(cases):
        features = similarity_features(layout, dtype, batch, channels, height, width, seed)
        prototypes = random((classes, channels), seed + 100).to(dtype)
        if seed % 2 == 0:  # zero-norm features and prototypes take the clamped-norm branch
            prototypes[1] = 0
            (features[1] if layout == "flat" else features[0, :, 1, 2]).zero_()
        grad_logits = random(logits_shape(features, classes), seed + 200).to(dtype)
        checks.append(Check(f"similarity fwd+bwd {layout} {DTYPE_NAMES[dtype]} D={channels} K={classes}",
                            similarity_requests(features, prototypes, grad_logits, 0.08),
                            expect_similarity(features, prototypes, grad_logits, 0.08)))
    # Huge finite rows (every other pixel, two prototypes), whose squared norms overflow: rescaled.
    for seed, (layout, dtype, huge) in enumerate([("channels_first", torch.float32, 1e20),
                                                  ("flat", torch.float32, 3e38), ("channels_last", torch.float64, 1e308)]):
        unit = similarity_features(layout, torch.float64, 2, 12, 3, 5, seed + 500)
        unit = unit / unit.abs().amax(1, keepdim=True)
        feature_scale = torch.ones_like(unit[:, :1])
        feature_scale.view(-1)[::2] = huge
        prototypes = random((5, 12), seed + 600)
        prototypes /= prototypes.abs().amax(1, keepdim=True)
        prototype_scale = torch.tensor([[huge], [1.0], [1.0], [huge], [1.0]], dtype=torch.float64)
        features = (unit * feature_scale).to(dtype)
        if layout == "channels_last":
            features = features.contiguous(memory_format=torch.channels_last)
        grad_logits = random(logits_shape(features, 5), seed + 700).to(dtype)
        checks.append(Check(f"similarity fwd+bwd {layout} {DTYPE_NAMES[dtype]} rows of {huge:g} (squared norm overflows)",
                            similarity_requests(features, (prototypes * prototype_scale).to(dtype), grad_logits, 0.08),
                            expect_similarity(features, (prototypes * prototype_scale).to(dtype), grad_logits, 0.08,
                                              feature_scale, prototype_scale)))
    # The same call twice, in separate simulator runs: the same bits (no atomics, fixed sum orders).
    features = similarity_features("channels_last", torch.float32, 2, 20, 10, 30, 800)
    prototypes = random((19, 20), 801).to(torch.float32)
    grad_logits = random(logits_shape(features, 19), 802).to(torch.float32)
    requests = [request for _ in range(2) for request in similarity_requests(features, prototypes, grad_logits, 0.08)]
    checks.append(Check("similarity fwd+bwd channels_last float32 B=2 P=300: repeated calls bit for bit", requests,
                        expect_similarity_repeated(features, prototypes, grad_logits, 0.08)))
    return checks + euclidean_checks()


def euclidean_checks() -> List[Check]:
    """The euclidean metric, which runs the current kernels in both generations at any K: each
    layout and dtype; K at the register widths' edges (1, 8 | 9, 20 | 21, 32) and above them in
    chunks of 32 classes (33, 45, 70: the feature gradient carried between chunks); D not a multiple
    of 16 and three channel blocks of the prototype gradient (128 channels each); 255, 256 and 257
    pixels around a tile, and two and three prototype-gradient chunks of 512 pixels. Every problem
    has a pixel equal to a prototype (distance 0: logit 0 and no gradient from that term) and one
    within 1e-4 of another (differences, not |f|^2 - 2<f, c> + |c|^2, keep its gradient accurate)."""
    checks = []
    cases = [("channels_first", torch.float32, 2, 24, 5, 7, 19), ("channels_last", torch.float32, 2, 24, 5, 7, 19),
             ("flat", torch.float64, 1, 20, 3, 7, 9), ("channels_last", torch.float16, 2, 16, 4, 5, 19),
             ("channels_first", torch.float32, 1, 16, 3, 5, 1), ("flat", torch.float32, 1, 24, 1, 7, 8),
             ("channels_first", torch.float64, 1, 37, 10, 30, 21), ("flat", torch.float16, 1, 40, 6, 10, 20),
             ("channels_last", torch.float32, 1, 20, 4, 5, 32), ("flat", torch.float32, 1, 12, 5, 5, 33),
             ("channels_first", torch.float16, 1, 12, 4, 6, 45), ("channels_last", torch.float64, 2, 20, 3, 50, 45),
             ("flat", torch.float64, 1, 9, 2, 10, 70), ("channels_first", torch.float32, 1, 260, 2, 10, 3),
             ("flat", torch.float32, 1, 19, 1, 255, 20), ("channels_first", torch.float32, 1, 17, 16, 16, 9),
             ("channels_last", torch.float32, 1, 18, 1, 257, 8), ("flat", torch.float64, 1, 8, 30, 40, 19)]
    for seed, (layout, dtype, batch, channels, height, width, classes) in enumerate(cases):
        features, prototypes = euclidean_problem(layout, dtype, batch, channels, height, width, classes, seed + 1000)
        grad_logits = random(logits_shape(features, classes), seed + 1200).to(dtype)
        pixels = batch * height * width
        checks.append(Check(f"similarity euclidean fwd+bwd {layout} {DTYPE_NAMES[dtype]} D={channels} K={classes} "
                            f"P={pixels}", similarity_requests(features, prototypes, grad_logits, 0.08, "euclidean"),
                            expect_similarity(features, prototypes, grad_logits, 0.08, metric="euclidean")))
    # The same calls twice, in separate simulator runs: the same bits, in one class chunk and in two.
    for classes in (19, 45):
        features, prototypes = euclidean_problem("channels_last", torch.float32, 2, 20, 10, 30, classes, 1100 + classes)
        grad_logits = random(logits_shape(features, classes), 1101).to(torch.float32)
        requests = [request for _ in range(2)
                    for request in similarity_requests(features, prototypes, grad_logits, 0.08, "euclidean")]
        checks.append(Check(f"similarity euclidean fwd+bwd channels_last float32 B=2 P=300 K={classes}: repeated calls "
                            "bit for bit", requests,
                            expect_similarity_repeated(features, prototypes, grad_logits, 0.08, "euclidean")))
    return checks


def euclidean_problem(layout: str, dtype: torch.dtype, batch: int, channels: int, height: int, width: int,
                      classes: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Features and prototypes with the first pixel equal to the last prototype and the last pixel
    within 1e-4 of the first prototype."""
    features = similarity_features(layout, dtype, batch, channels, height, width, seed)
    prototypes = random((classes, channels), seed + 1).to(dtype)
    first, last = (features[0], features[-1]) if layout == "flat" else (features[0, :, 0, 0], features[-1, :, -1, -1])
    first.copy_(prototypes[-1])
    last.copy_(prototypes[0] + (random((channels,), seed + 2) * 1e-4).to(dtype))
    return features, prototypes


def expect_similarity_repeated(features: torch.Tensor, prototypes: torch.Tensor, grad_logits: torch.Tensor,
                               temperature: float, metric: str = "cosine"):
    """expect_similarity on the first (forward, backward) pair; every pair's outputs the same bits."""
    expected = expect_similarity(features, prototypes, grad_logits, temperature, metric=metric)

    def verify(requests: List[Request]) -> None:
        expected(requests[:2])
        bits_equal(requests[0::2], "logits")
        bits_equal(requests[1::2], "grad_features")
        bits_equal(requests[1::2], "grad_prototypes")
    return verify


# ---- update_prototypes ----

def prototype_request(prototypes: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, momentum: float,
                      ignore_index: int) -> Request:
    view, label_view = as_batch_channel_pixel(features), labels.reshape(1, -1) if labels.dim() == 1 else labels.flatten(1)
    numbers = {"label_dtype": DTYPE_NAMES[labels.dtype], "classes": prototypes.shape[0],
               "channels": prototypes.shape[1], "batch": label_view.shape[0], "pixels": label_view.shape[1],
               "momentum": repr(momentum), "ignore_index": ignore_index}
    return Request("update_prototypes", features.dtype,
                   {"prototypes": prototypes, "features": view, "labels": label_view}, numbers,
                   {"new_prototypes": Output(prototypes.dtype, tuple(prototypes.shape)),
                    "counts": Output(torch.int64, (prototypes.shape[0],))})


def expect_prototypes(prototypes, features, labels, momentum, ignore_index):
    """The fp64 reference's answer, or the flag behind its ValueError; with several launches of the
    same problem, also the same bits from each."""
    def verify(requests: List[Request]) -> None:
        try:
            expected, counts = reference.update_prototypes(prototypes.double(), features.double(), labels, momentum,
                                                           ignore_index)
        except ValueError as error:
            wanted = PROTOTYPE_BAD_LABEL if "labels" in str(error) else PROTOTYPE_NON_FINITE
            for request in requests:
                assert request.flags[wanted] and not request.flags[1 - wanted], (
                    f"flags {request.flags}, reference: {error}")
            return
        for request in requests:
            assert not any(request.flags), f"flags {request.flags} on valid input"
            assert torch.equal(request.results["counts"], counts), f"counts {request.results['counts']} != {counts}"
            close(request.results["new_prototypes"], expected, features.dtype)
        bits_equal(requests, "new_prototypes")
    return verify


def prototype_checks() -> List[Check]:
    checks = []
    cases = [("channels_first", torch.float32, torch.int64, 40), ("channels_last", torch.float32, torch.uint8, 19),
             ("flat", torch.float64, torch.int32, 70), ("channels_first", torch.float16, torch.int64, 19)]
    for seed, (layout, dtype, label_dtype, classes) in enumerate(cases):
        features = similarity_features(layout, dtype, 2, 12, 6, 7, seed + 300)
        pixels = features.shape[0] if layout == "flat" else (2, 6, 7)
        # Labels from the lower half of the classes only (the rest are absent), and ignored pixels.
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, classes // 2, pixels if isinstance(pixels, tuple) else (pixels,), generator=generator)
        labels[labels % 5 == 0] = 255
        labels = labels.to(label_dtype)
        prototypes = random((classes, 12), seed + 400).to(dtype)
        checks.append(Check(f"update_prototypes {layout} {DTYPE_NAMES[dtype]} labels {DTYPE_NAMES[label_dtype]} "
                            f"K={classes} (absent classes, ignored pixels)",
                            [prototype_request(prototypes, features, labels, 0.9, 255)],
                            expect_prototypes(prototypes, features, labels, 0.9, 255)))
    features = similarity_features("channels_first", torch.float32, 2, 12, 6, 7, 350)
    prototypes = random((40, 12), 351).to(torch.float32)
    labels = torch.randint(0, 40, (2, 6, 7), generator=torch.Generator().manual_seed(352))
    bad_label = labels.clone()
    bad_label[1, 5, 6] = 40
    checks.append(Check("update_prototypes label K raises", [prototype_request(prototypes, features, bad_label, 0.9, 255)],
                        expect_prototypes(prototypes, features, bad_label, 0.9, 255)))
    nan_features = features.clone()
    nan_features[0, 3, 2, 2] = math.nan
    checks.append(Check("update_prototypes NaN feature raises",
                        [prototype_request(prototypes, nan_features, labels, 0.9, 255)],
                        expect_prototypes(prototypes, nan_features, labels, 0.9, 255)))
    ignored = labels.clone()
    ignored[0, 2, 2] = 255
    checks.append(Check("update_prototypes NaN feature of an ignored pixel is fine",
                        [prototype_request(prototypes, nan_features, ignored, 0.9, 255)],
                        expect_prototypes(prototypes, nan_features, ignored, 0.9, 255)))
    checks += prototype_edge_checks()
    return checks


def prototype_problem(layout: str, dtype: torch.dtype, label_dtype: torch.dtype, batch: int, channels: int,
                      height: int, width: int, classes: int, seed: int,
                      runs: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, labels (every class, runs of ``runs`` equal labels, a fifth ignored) and prototypes."""
    features = similarity_features(layout, dtype, batch, channels, height, width, seed)
    shape = (batch * height * width,) if layout == "flat" else (batch, height, width)
    generator = torch.Generator().manual_seed(seed)
    pixels = batch * height * width
    labels = torch.randint(0, classes, (pixels // runs + 1,), generator=generator).repeat_interleave(runs)[:pixels]
    labels[torch.rand(pixels, generator=generator) < 0.2] = 255
    return features, labels.reshape(shape).to(label_dtype), random((classes, channels), seed + 1).to(dtype)


def prototype_edge_checks() -> List[Check]:
    """The current kernels' edges (prototype_update_kernels.cuh): warp tiles of 32 pixels and blocks
    of 4 of them, chunks of 2,048 pixels merged in order, channel groups of 32, class groups
    (29 classes a block in fp32, 13 in fp64), runs of equal labels, each load direction."""
    checks = []
    cases = [  # name, layout, dtype, label dtype, B, D, H, W, K, runs
        ("fewer pixels than a warp tile, K=1", "flat", torch.float32, torch.int64, 1, 5, 1, 20, 1, 1),
        ("3 chunks, 2 channel groups, runs of 7 labels", "channels_first", torch.float32, torch.int64, 2, 40, 50, 51,
         19, 7),
        ("3 chunks, 2 channel groups, runs of 5 labels", "flat", torch.float32, torch.int32, 1, 33, 47, 100, 19, 5),
        ("K=100: 4 class groups", "channels_last", torch.float32, torch.uint8, 1, 8, 9, 23, 100, 1),
        ("K=30: 3 class groups in fp64", "channels_first", torch.float64, torch.int64, 2, 9, 5, 13, 30, 3),
        ("images of one pixel", "channels_first", torch.float16, torch.int32, 37, 16, 1, 1, 5, 1),
    ]
    for seed, (name, layout, dtype, label_dtype, batch, channels, height, width, classes, runs) in enumerate(cases):
        features, labels, prototypes = prototype_problem(layout, dtype, label_dtype, batch, channels, height, width,
                                                         classes, seed + 900, runs)
        checks.append(Check(f"update_prototypes {layout} {DTYPE_NAMES[dtype]} {name}",
                            [prototype_request(prototypes, features, labels, 0.9, 255)],
                            expect_prototypes(prototypes, features, labels, 0.9, 255)))
    features, labels, prototypes = prototype_problem("channels_first", torch.float32, torch.int64, 1, 12, 40, 60, 19,
                                                     920, 3)
    checks.append(Check("update_prototypes 2 chunks: the same bits from 2 launches",
                        [prototype_request(prototypes, features, labels, 0.9, 255) for _ in range(2)],
                        expect_prototypes(prototypes, features, labels, 0.9, 255)))
    all_ignored = torch.full_like(labels, 255)
    checks.append(Check("update_prototypes all pixels ignored",
                        [prototype_request(prototypes, features, all_ignored, 0.9, 255)],
                        expect_prototypes(prototypes, features, all_ignored, 0.9, 255)))
    checks.append(Check("update_prototypes ignore_index=3 inside [0, K): label 255 raises",
                        [prototype_request(prototypes, features, labels, 0.9, 3)],
                        expect_prototypes(prototypes, features, labels, 0.9, 3)))
    checks.append(Check("update_prototypes ignore_index=3 inside [0, K)",
                        [prototype_request(prototypes, features, labels.where(labels != 255, 3), 0.9, 3)],
                        expect_prototypes(prototypes, features, labels.where(labels != 255, 3), 0.9, 3)))
    negative = labels.to(torch.int32)
    negative[0, 39, 59] = -2  # the last pixel of the last chunk
    checks.append(Check("update_prototypes label -2 raises", [prototype_request(prototypes, features, negative, 0.9, 255)],
                        expect_prototypes(prototypes, features, negative, 0.9, 255)))
    return checks


# ---- rectify_pseudo_labels ----

def rectify_request(soft: torch.Tensor, logits: torch.Tensor, threshold: float, ignore_index: int) -> Request:
    batch, classes, height, width = soft.shape
    numbers = {"batch": batch, "classes": classes, "pixels": height * width, "threshold": repr(threshold),
               "ignore_index": ignore_index}
    return Request("rectify", soft.dtype,
                   {"soft": as_batch_channel_pixel(soft), "logits": as_batch_channel_pixel(logits)}, numbers,
                   {"labels": Output(torch.int64, (batch, height, width)),
                    "confidence": Output(soft.dtype, (batch, height, width))})


def expect_rectify(soft, logits, threshold, ignore_index):
    def verify(requests: List[Request]) -> None:
        (request,) = requests
        try:
            labels, confidence = reference.rectify_pseudo_labels(soft.double(), logits.double(), threshold, ignore_index)
        except ValueError as error:
            assert request.flags == [1], f"flags {request.flags}, reference: {error}"
            return
        assert request.flags == [0], f"flags {request.flags} on valid input"
        assert torch.equal(request.results["labels"], labels), "labels differ"
        close(request.results["confidence"], confidence, soft.dtype)
    return verify


def rectify_checks() -> List[Check]:
    checks = []
    for seed, (dtype, layout) in enumerate([(torch.float32, "channels_first"), (torch.float64, "channels_last"),
                                            (torch.float16, "channels_first")]):
        soft = random((2, 19, 5, 6), seed + 500).softmax(1).to(dtype)
        soft[0, :, 1, 1] = 0  # a pixel without mass: ignore_index, confidence 0
        soft[1, 3:, 2, 4] = 0
        logits = random((2, 19, 5, 6), seed + 600, scale=5.0).to(dtype)
        if layout == "channels_last":
            soft, logits = (t.contiguous(memory_format=torch.channels_last) for t in (soft, logits))
        checks.append(Check(f"rectify {layout} {DTYPE_NAMES[dtype]} (zero-mass pixels, threshold 0.3)",
                            [rectify_request(soft, logits, 0.3, 255)], expect_rectify(soft, logits, 0.3, 255)))
    soft = random((2, 19, 4, 5), 702).softmax(1).to(torch.float32)
    soft[0, :, 1, 1] = 0
    large = (1e8 + random((2, 19, 4, 5), 703).round() * 8).to(torch.float32)  # log p next to large logits
    checks.append(Check("rectify logits near 1e8 (zero-mass pixels)", [rectify_request(soft, large, 0.0, 255)],
                        expect_rectify(soft, large, 0.0, 255)))
    soft = random((1, 19, 4, 4), 700).softmax(1).to(torch.float32)
    logits = random((1, 19, 4, 4), 701).to(torch.float32)
    negative = soft.clone()
    negative[0, 2, 3, 3] = -0.1
    checks.append(Check("rectify negative soft label raises", [rectify_request(negative, logits, 0.0, 255)],
                        expect_rectify(negative, logits, 0.0, 255)))
    nan_logits = logits.clone()
    nan_logits[0, 0, 0, 1] = math.nan
    checks.append(Check("rectify NaN logit raises", [rectify_request(soft, nan_logits, 0.0, 255)],
                        expect_rectify(soft, nan_logits, 0.0, 255)))
    return checks


def all_checks() -> List[Check]:
    return similarity_checks() + prototype_checks() + rectify_checks() + sinkhorn_checks()


def run_group(kit: Path, ptx: Path, runner: Path, folders: List[Path], log: Path, generation: str) -> str:
    """One simulator process over several requests, launching the kernels of ``generation``
    (csrc/include/cpsl_ops/kernel_generation.h); returns what it said when it failed."""
    env = {**os.environ, "GPUSIM_LOG": str(log), "CPSL_OPS_CUDA_KERNELS": generation}
    result = subprocess.run([str(kit / "run.sh"), str(ptx), str(runner), *map(str, folders)],
                            capture_output=True, text=True, env=env)
    return "" if result.returncode == 0 else result.stderr.strip()[-500:]


def run_checks(checks: List[Check], args: argparse.Namespace, generation: str) -> int:
    """Runs ``checks`` on the kernels of ``generation``, prints a line per check; returns the passes."""
    work = Path(tempfile.mkdtemp(prefix=f"gpusim-checks-{generation}-"))
    requests = [request for check in checks for request in check.requests]
    for index, request in enumerate(requests):
        request.write(work / f"request{index:04d}")
    # The largest requests first, each to the process with the least work so far: simulated time
    # grows with the elements an op reads.
    groups: List[List[Path]] = [[] for _ in range(args.jobs)]
    loads = [0] * args.jobs
    for request in sorted(requests, key=lambda r: -r.elements()):
        j = loads.index(min(loads))
        groups[j].append(request.folder)
        loads[j] += request.elements()
    with ThreadPoolExecutor(args.jobs) as pool:
        failures = list(pool.map(lambda j: run_group(args.kit, args.ptx, args.runner, groups[j],
                                                     work / f"sim{j}.log", generation), range(args.jobs)))
    for failure in filter(None, failures):
        print(f"simulator process failed: {failure}")

    passed = 0
    tag = "" if generation == "current" else f"[{generation}] "
    for check in checks:
        for request in check.requests:
            request.read()
        errors = [r.error for r in check.requests if r.error]
        try:
            assert not errors, errors[0]
            check.verify(check.requests)
        except AssertionError as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            print(f"FAIL {tag}{check.name}: {'; '.join(lines[:4]) or 'mismatch'}")
            continue
        passed += 1
        print(f"ok   {tag}{check.name}")
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", type=Path, required=True, help="the gpusim kit (../shared/gpusim)")
    parser.add_argument("--ptx", type=Path, required=True, help="PTX of sim_ops.cu, as the simulator reads it")
    parser.add_argument("--runner", type=Path, required=True, help="sim_ops, linked against the simulator")
    parser.add_argument("--jobs", type=int, default=2, help="simulator processes at once")
    parser.add_argument("--filter", default="", help="only the checks whose name matches this regex")
    parser.add_argument("--generations", default="current,previous",
                        help="the kernel generations to check (CPSL_OPS_CUDA_KERNELS), comma-separated")
    args = parser.parse_args()

    generations = args.generations.split(",")
    passed = total = 0
    for generation in generations:
        # Fresh requests per generation: a check reads its results back into its own requests.
        checks = [check for check in all_checks() if re.search(args.filter, check.name)]
        passed += run_checks(checks, args, generation)
        total += len(checks)
    print(f"gpusim: {passed}/{total} kernel checks pass")
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
