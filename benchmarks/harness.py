"""Timing, bandwidth and reporting shared by the benchmark scripts.

Each measurement is a row: an operation, a size, an implementation, the median time over repeats
after warm-up (CUDA events on GPUs), the spread (25th to 75th percentile), the achieved GB/s for
the bytes the operation must move, the ratio against the eager PyTorch reference and, where the
script sets one, the row's floor: the bytes the operation must move divided by the copy bandwidth
measured in the same run, with the fraction of it the row reaches (floor / time; 1 is the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

import cpsl_ops

REFERENCE = "reference-eager"


@dataclass
class Row:
    op: str
    size: str
    impl: str
    median_ms: float
    p25_ms: float
    p75_ms: float
    gbytes: float
    params: Dict[str, object] = field(default_factory=dict)
    speedup_vs_reference: Optional[float] = None
    floor_ms: Optional[float] = None

    @property
    def gb_per_s(self) -> float:
        return self.gbytes / (self.median_ms / 1e3)

    @property
    def of_floor(self) -> Optional[float]:
        return None if self.floor_ms is None else self.floor_ms / self.median_ms


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
            warmup_s: float) -> List[float]:
    """Times of ``repeats`` calls of ``fn`` in milliseconds, after at least ``warmup`` calls and at
    least ``warmup_s`` seconds of calls. The time floor is for the first calls that touch a large
    fresh output: the OS hands out memory no call has used before more slowly (on the 2-core VM
    of benchmarks/results, a kernel's first ten calls at CPSL's size took up to 3x its steady time),
    and a training loop calls the op thousands of times."""
    start_s = time.perf_counter()
    calls = 0
    while calls < warmup or time.perf_counter() - start_s < warmup_s:
        fn()
        synchronize(device)
        calls += 1
    times: List[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return times


def make_row(op: str, size: str, impl: str, times: List[float], gbytes: float, **params) -> Row:
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Row(op, size, impl, statistics.median(times), quartiles[0], quartiles[2], gbytes, params)


def add_speedups(rows: List[Row]) -> None:
    """Fill speedup_vs_reference for every row that has a reference row of the same op and size."""
    reference = {(r.op, r.size, str(r.params)): r.median_ms for r in rows if r.impl == REFERENCE}
    for row in rows:
        base = reference.get((row.op, row.size, str(row.params)))
        row.speedup_vs_reference = None if base is None else base / row.median_ms


def set_floor(rows: List[Row], op: str, size: str, floor_ms: float) -> None:
    """Give every row of ``op`` at ``size`` the same floor (see the module docstring)."""
    for row in rows:
        if row.op == op and row.size == size:
            row.floor_ms = floor_ms


def print_table(rows: List[Row], title: str) -> None:
    print(f"\n{title}")
    header = (f"{'op':<22} {'size':<26} {'impl':<20} {'median ms':>10} {'p25-p75 ms':>17} {'GB/s':>8} {'vs ref':>7} "
              f"{'floor ms':>9} {'of floor':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        speedup = "" if row.speedup_vs_reference is None else f"{row.speedup_vs_reference:6.2f}x"
        spread = f"{row.p25_ms:.3f}-{row.p75_ms:.3f}"
        floor = "" if row.floor_ms is None else f"{row.floor_ms:9.3f}"
        of_floor = "" if row.of_floor is None else f"{row.of_floor:7.0%}"
        print(f"{row.op:<22} {row.size:<26} {row.impl:<20} {row.median_ms:10.3f} {spread:>17} "
              f"{row.gb_per_s:8.2f} {speedup:>7} {floor:>9} {of_floor:>8}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> Dict[str, object]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=Path(__file__).parent).stdout.strip()
        if commit and changed:  # the numbers belong to uncommitted code
            commit += "-dirty"
    except OSError:
        commit = None
    info: Dict[str, object] = {
        "commit": commit,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "cpsl_ops": cpsl_ops.build_info(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def save(rows: List[Row], extra: Dict[str, object], device: torch.device, path: Optional[str]) -> None:
    if not path:
        return
    payload = {"environment": environment(device), **extra,
               "rows": [dict(asdict(r), gb_per_s=r.gb_per_s, of_floor=r.of_floor) for r in rows]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")


def plot(rows: List[Row], op: str, path: Optional[str], title: str) -> None:
    """Time against N per implementation; needs matplotlib (optional extra), else says so."""
    if not path:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'cpsl-ops[bench]')")
        return
    figure, axis = plt.subplots(figsize=(7, 4.5))
    selected = [r for r in rows if r.op == op and "N" in r.params]
    for impl in sorted({r.impl for r in selected}):
        points = sorted((r.params["N"], r.median_ms) for r in selected if r.impl == impl)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("N (samples per problem)")
    axis.set_ylabel("median time (ms)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def warmup_seconds(args: argparse.Namespace) -> float:
    if args.warmup_s is not None:
        return args.warmup_s
    return 0.2 if args.quick else 1.0


def compiler_for(device: torch.device) -> Optional[str]:
    """The compiler that torch.compile's generated code needs on ``device``, if this machine has it:
    Triton's launchers are C (CC, else gcc, else clang), Inductor's CPU kernels C++ (CXX, else g++)."""
    variable, *programs = ("CC", "gcc", "clang") if device.type == "cuda" else ("CXX", "g++")
    return os.environ.get(variable) or next(filter(None, map(shutil.which, programs)), None)


def compile_reference(args: argparse.Namespace, device: torch.device) -> bool:
    """Whether to time the torch.compile'd reference: not with --no-compile, and not where its
    generated code cannot be built (a GPU machine may have no compiler), which is said once."""
    if args.no_compile:
        return False
    if compiler_for(device) is None:
        print(f"note: no compiler for torch.compile's {device.type} code (see harness.compiler_for): "
              "no 'reference-compiled' rows")
        return False
    return True


def parse_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, with a device this suite can time on (cpu or cuda; not checked for presence,
    so that --check-args can run on a machine without the device)."""
    args = parser.parse_args()
    try:
        device_type = torch.device(args.device).type
    except RuntimeError as error:
        parser.error(str(error))
    if device_type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.warmup_s is not None and args.warmup_s < 0:
        parser.error("--warmup-s must not be negative")
    return args


def common_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--check-args", action="store_true",
                        help="check the arguments and print what would be timed, then stop without timing "
                             "(benchmarks/gpu_suite.sh rehearse runs the GPU suite's arguments so)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (under a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row")
    parser.add_argument("--warmup-s", type=float, default=None,
                        help="least seconds of untimed calls before each row (default 1, 0.2 with --quick)")
    parser.add_argument("--json", default=None, help="write the rows and environment to this JSON file")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile'd reference (skipped anyway where its compiler is missing)")
    return parser
