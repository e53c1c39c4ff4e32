"""Balanced Sinkhorn: the fused kernel against the PyTorch reference and peers.

Implementations, side by side in one process:
  native-<device>      cpsl_ops.balanced_sinkhorn (the C++/CUDA kernel; B problems in one call)
  reference-eager      cpsl_ops.reference.balanced_sinkhorn, the log-domain PyTorch spec
  reference-compiled   the same under torch.compile
  official-loop        the official code's exp-domain loop, one call per image
  pot                  Python Optimal Transport's ot.sinkhorn with the same marginals, ε and a
                       fixed iteration count (optional: pip install pot)
  dino-exp             the case dino only: the SwAV/DINO teacher's Sinkhorn-Knopp as DINOv3 runs
                       it (exponential domain, no maximum subtracted, uniform marginals), eager,
                       and dino-exp-compiled, the same under torch.compile
Also printed: the time this machine takes to read and write the score matrix once (a copy), times
the iteration count — the memory bound of an unfused iteration — and each row's floor: reading
the scores T + 1 times and writing the assignment once at the copy's bandwidth, (T + 2) / 2 copies.

    python benchmarks/bench_sinkhorn.py [--quick] [--device cuda] [--cases cpsl,cpsl-16x] [--warmup-s S]
                                        [--json out.json] [--plot out.png] [--no-compile] [--check-args]

Cases: cpsl (8 x 65,792 x 19, T = 3), cpsl-16x (16 times as many problems; default on CUDA only),
sweep-N, sweep-K, sweep-T, sweep-dtype, epsilon (ε = 0.01); all but cpsl-16x by default. dino
(not by default): a SwAV/DINO-size assignment, 1,024 teacher outputs over 65,536 prototypes with
the uniform prior, T = 3, ε = 0.04 (the teacher temperature), timed; then, at 256 x 4,096, whether
each form stays finite in fp32, fp16 and bf16 at temperatures 0.04 and 0.01, and how far it is
from the fp64 log-domain reference.
"""

from __future__ import annotations

import statistics
from typing import Callable, Dict, List, Tuple

import torch

import cpsl_ops
from cpsl_ops import reference

try:  # run as a script (python benchmarks/bench_sinkhorn.py) or as a module
    from harness import (REFERENCE, Row, add_speedups, common_arguments, compile_reference, make_row, measure,
                         parse_arguments, plot, print_table, save, set_floor, warmup_seconds)
except ImportError:
    from benchmarks.harness import (REFERENCE, Row, add_speedups, common_arguments, compile_reference, make_row,
                                    measure, parse_arguments, plot, print_table, save, set_floor, warmup_seconds)

CPSL_PRIOR = [0.37922, 0.04930, 0.22665, 0.01551, 0.01721, 0.01403, 0.00219, 0.00221, 0.13338, 0.02424, 0.04341,
              0.01315, 0.00161, 0.06605, 0.00408, 0.00279, 0.00185, 0.00123, 0.00191]
CASES = ("cpsl", "cpsl-16x", "sweep-N", "sweep-K", "sweep-T", "sweep-dtype", "epsilon", "dino")
DEFAULT_CASES = set(CASES) - {"cpsl-16x", "dino"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def official_loop(scores: torch.Tensor, prior: torch.Tensor, epsilon: float, num_iters: int) -> torch.Tensor:
    """The official CPSL routine (exp domain), called once per image as its training step does."""
    outputs = []
    for problem, r in zip(scores, prior):
        q = torch.exp(problem / epsilon).T
        q = q / q.sum()
        samples = q.shape[1]
        for _ in range(num_iters):
            q = q / q.sum(dim=1, keepdim=True) * r[:, None]
            q = q / q.sum(dim=0, keepdim=True) / samples
        outputs.append((q * samples).T)
    return torch.stack(outputs)


def dino_exp_domain(scores: torch.Tensor, temperature: float, num_iters: int) -> torch.Tensor:
    """The teacher's Sinkhorn-Knopp of SwAV/DINO as DINOv3 describes it: (B, K) scores to a (B, K)
    assignment whose prototype marginal is uniform and whose rows sum to one, in the exponential
    domain without subtracting a maximum (so exp(s/ε) can overflow), in the scores' dtype. Written
    from the method's description for this comparison; a distributed run would all-reduce each sum."""
    q = torch.exp(scores / temperature).t()  # (K, B)
    prototypes, samples = q.shape
    q = q / q.sum()
    for _ in range(num_iters):
        q = q / q.sum(dim=1, keepdim=True) / prototypes
        q = q / q.sum(dim=0, keepdim=True) / samples
    return (q * samples).t()


def pot_sinkhorn() -> Callable | None:
    try:
        import ot
    except ImportError:
        return None

    def run(scores: torch.Tensor, prior: torch.Tensor, epsilon: float, num_iters: int) -> torch.Tensor:
        outputs = []
        for problem, r in zip(scores, prior):
            samples = problem.new_full((problem.shape[0],), 1.0 / problem.shape[0])
            plan = ot.sinkhorn(samples, r, -problem, epsilon, numItermax=num_iters, stopThr=0.0, warn=False)
            outputs.append(plan * problem.shape[0])
        return torch.stack(outputs)

    return run


def make_problem(batch: int, samples: int, classes: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # Cosine-like scores in [-1, 1], as CPSL feeds Sinkhorn.
    scores = torch.rand(batch, samples, classes, generator=generator).mul_(2).sub_(1).to(device=device, dtype=dtype)
    if classes == len(CPSL_PRIOR):
        prior = torch.tensor(CPSL_PRIOR)
    else:
        prior = torch.rand(classes, generator=generator) + 0.05
    prior = (prior / prior.sum()).to(device).expand(batch, classes).contiguous()
    return scores, prior


def run_case(rows: List[Row], label: str, batch: int, samples: int, classes: int, num_iters: int, dtype_name: str,
             device: torch.device, args, compiled: Callable | None, pot: Callable | None, epsilon: float = 0.05) -> None:
    dtype = DTYPES[dtype_name]
    scores, prior = make_problem(batch, samples, classes, dtype, device)
    element_bytes = scores.element_size()
    moved = 2 * scores.numel() * element_bytes / 1e9  # read the scores once, write the assignment once
    size = f"{batch}x{samples}x{classes} T={num_iters} {dtype_name}"
    params: Dict[str, object] = {"B": batch, "N": samples, "K": classes, "T": num_iters, "dtype": dtype_name,
                                 "epsilon": epsilon, "case": label}
    big = scores.numel() > 20_000_000
    repeats = args.repeats or (3 if args.quick or big else 10)
    warmup = 1 if big else 2

    def add(impl: str, fn: Callable[[], object]) -> None:
        rows.append(make_row("balanced_sinkhorn", size, impl, measure(fn, device, warmup, repeats, warmup_seconds(args)), moved, **params))

    native = "native-" + device.type
    if cpsl_ops.native_available():
        add(native, lambda: cpsl_ops.balanced_sinkhorn(scores, prior, epsilon, num_iters))
    add(REFERENCE, lambda: reference.balanced_sinkhorn(scores, prior, epsilon, num_iters))
    if compiled is not None:
        add("reference-compiled", lambda: compiled(scores, prior, epsilon, num_iters))
    if dtype == torch.float32 and batch * samples <= 2_000_000:
        add("official-loop", lambda: official_loop(scores, prior, epsilon, num_iters))
        if pot is not None:
            add("pot", lambda: pot(scores, prior, epsilon, num_iters))
    copy_target = torch.empty_like(scores)
    copy_times = measure(lambda: copy_target.copy_(scores), device, warmup, repeats, warmup_seconds(args))
    bound = make_row("balanced_sinkhorn", size, f"bound: {num_iters} x copy", [t * num_iters for t in copy_times],
                     moved, **params)
    rows.append(bound)
    set_floor(rows, "balanced_sinkhorn", size, statistics.median(copy_times) * (num_iters + 2) / 2)


DINO_SIZE = (1024, 65_536)  # teacher outputs, prototypes (DINO's head: 65,536)
DINO_CHECK_SIZE = (256, 4096)
DINO_TEMPERATURES = (0.04, 0.01)


def dino_rows(rows: List[Row], device: torch.device, args, compile_enabled: bool) -> None:
    """The dino case's timed rows: one (B, K) problem with the uniform prior, ε = 0.04, T = 3."""
    samples, prototypes = DINO_SIZE
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(samples, prototypes, generator=generator).mul_(2).sub_(1).to(device)
    uniform = torch.full((1, prototypes), 1.0 / prototypes, device=device)
    size, temperature, num_iters = f"1x{samples}x{prototypes} T=3 fp32 uniform", 0.04, 3
    params: Dict[str, object] = {"B": 1, "N": samples, "K": prototypes, "T": num_iters, "dtype": "fp32",
                                 "epsilon": temperature, "case": "dino"}
    moved = 2 * scores.numel() * scores.element_size() / 1e9
    repeats = args.repeats or 3
    implementations: Dict[str, Callable[[], object] | None] = {
        REFERENCE: lambda: reference.balanced_sinkhorn(scores[None], uniform, temperature, num_iters),
        "dino-exp": lambda: dino_exp_domain(scores, temperature, num_iters),
    }
    if cpsl_ops.native_available():
        implementations = {"native-" + device.type: lambda: cpsl_ops.balanced_sinkhorn(
            scores[None], uniform, temperature, num_iters), **implementations}
    if compile_enabled:
        compiled = torch.compile(dino_exp_domain)
        implementations["dino-exp-compiled"] = lambda: compiled(scores, temperature, num_iters)
    for impl, fn in implementations.items():
        if fn is not None:
            rows.append(make_row("balanced_sinkhorn", size, impl,
                                 measure(fn, device, 1, repeats, warmup_seconds(args)), moved, **params))
    copy_target = torch.empty_like(scores)
    copy_ms = statistics.median(measure(lambda: copy_target.copy_(scores), device, 1, repeats, warmup_seconds(args)))
    set_floor(rows, "balanced_sinkhorn", size, copy_ms * (num_iters + 2) / 2)


def dino_overflow(device: torch.device) -> List[Dict[str, object]]:
    """Whether each form stays finite, by dtype and temperature, and its largest difference from the
    fp64 log-domain reference (an assignment's entries are at most 1)."""
    samples, prototypes = DINO_CHECK_SIZE
    scores = torch.rand(samples, prototypes, generator=torch.Generator().manual_seed(1)).mul_(2).sub_(1)
    uniform = torch.full((1, prototypes), 1.0 / prototypes)
    forms: Dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
        "dino-exp": lambda s, t: dino_exp_domain(s, t, 3),
    }
    if cpsl_ops.native_available():
        forms["native-" + device.type] = lambda s, t: cpsl_ops.balanced_sinkhorn(
            s[None], uniform.to(s.device), t, 3)[0]
    results = []
    for temperature in DINO_TEMPERATURES:
        exact = reference.balanced_sinkhorn(scores.double()[None], uniform.double(), temperature, 3)[0]
        for dtype_name in ("fp32", "fp16", "bf16"):
            for form, fn in forms.items():
                try:
                    out = fn(scores.to(device=device, dtype=DTYPES[dtype_name]), temperature).double().cpu()
                except ValueError as error:
                    results.append({"form": form, "dtype": dtype_name, "temperature": temperature,
                                    "outcome": f"raises ValueError: {str(error)[:60]}"})
                    continue
                finite = bool(torch.isfinite(out).all())
                results.append({"form": form, "dtype": dtype_name, "temperature": temperature,
                                "outcome": "finite" if finite else f"{int((~torch.isfinite(out)).sum())} non-finite",
                                "max_abs_error": (out - exact).abs().max().item() if finite else None})
    return results


def print_overflow(results: List[Dict[str, object]]) -> None:
    print(f"\nSwAV/DINO-style assignment at {DINO_CHECK_SIZE[0]}x{DINO_CHECK_SIZE[1]}, uniform prior, T=3: "
          "does it stay finite, and its largest |difference| from the fp64 log-domain reference")
    print(f"{'form':<14} {'dtype':<6} {'temperature':>11}  outcome")
    for r in results:
        error = "" if r.get("max_abs_error") is None else f", max |error| {r['max_abs_error']:.2e}"
        print(f"{r['form']:<14} {r['dtype']:<6} {r['temperature']:>11}  {r['outcome']}{error}")


def planned_cases(cases: set, quick: bool) -> List[Tuple[str, int, int, int, int, str, float]]:
    """(case, B, N, K, T, dtype, ε) of every row group the selected cases time, in order."""
    plan = []
    if "cpsl" in cases:
        plan.append(("cpsl", 8, 65_792, 19, 3, "fp32", 0.05))
    if "cpsl-16x" in cases:
        plan.append(("cpsl-16x", 128, 65_792, 19, 3, "fp32", 0.05))
    if "sweep-N" in cases:
        for samples in [1_000, 10_000, 65_792] if quick else [1_000, 10_000, 65_792, 262_144, 1_048_576, 4_194_304]:
            plan.append(("sweep-N", 1, samples, 19, 3, "fp32", 0.05))
    if not quick:
        plan += [("sweep-K", 1, 65_792, classes, 3, "fp32", 0.05) for classes in (64, 256) if "sweep-K" in cases]
        plan += [("sweep-T", 1, 65_792, 19, num_iters, "fp32", 0.05) for num_iters in (10, 50) if "sweep-T" in cases]
        plan += [("sweep-dtype", 8, 65_792, 19, 3, name, 0.05) for name in ("fp16", "bf16") if "sweep-dtype" in cases]
        if "epsilon" in cases:
            plan.append(("epsilon", 8, 65_792, 19, 3, "fp32", 0.01))
    return plan


def main() -> None:
    parser = common_arguments(__doc__)
    parser.add_argument("--plot", default=None, help="write a PNG of time against N (needs matplotlib)")
    parser.add_argument("--cases", default=None, help=f"comma-separated subset of: {', '.join(CASES)}")
    args = parse_arguments(parser)
    device = torch.device(args.device)
    cases = set(args.cases.split(",")) if args.cases else DEFAULT_CASES | ({"cpsl-16x"} if device.type == "cuda" else set())
    unknown = cases - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    plan = planned_cases(cases, args.quick)
    compile_enabled = compile_reference(args, device)
    if args.check_args:
        print(f"would time on {device}, reference-compiled {'on' if compile_enabled else 'off'}:")
        for label, batch, samples, classes, num_iters, dtype_name, epsilon in plan:
            print(f"  {label}: {batch}x{samples}x{classes} T={num_iters} {dtype_name} epsilon={epsilon}")
        if "dino" in cases:
            print(f"  dino: 1x{DINO_SIZE[0]}x{DINO_SIZE[1]} T=3 fp32 epsilon=0.04 uniform; overflow check at "
                  f"{DINO_CHECK_SIZE[0]}x{DINO_CHECK_SIZE[1]}")
        return
    torch.manual_seed(0)
    compiled = torch.compile(reference.balanced_sinkhorn, dynamic=True) if compile_enabled else None
    pot = pot_sinkhorn()
    if pot is None:
        print("note: POT (pip install pot) is not installed: no 'pot' rows")
    rows: List[Row] = []
    for label, batch, samples, classes, num_iters, dtype_name, epsilon in plan:
        run_case(rows, label, batch, samples, classes, num_iters, dtype_name, device, args, compiled, pot, epsilon)
    overflow: List[Dict[str, object]] = []
    if "dino" in cases:
        dino_rows(rows, device, args, compile_enabled)
        overflow = dino_overflow(device)

    add_speedups(rows)
    print_table(rows, f"balanced_sinkhorn on {device} (median of repeats; GB/s for one read of the scores and "
                      f"one write of the assignment)")
    cpsl = [r for r in rows if r.params.get("case") == "cpsl"]
    native = next((r for r in cpsl if r.impl.startswith("native")), None)
    if native is not None:
        by_impl = {r.impl: r.median_ms for r in cpsl}
        print(f"\nCPSL size: native {native.median_ms:.2f} ms; "
              + ", ".join(f"{impl} / native = {ms / native.median_ms:.2f}" for impl, ms in by_impl.items()
                          if impl != native.impl))
    if overflow:
        print_overflow(overflow)
    save(rows, {"benchmark": "balanced_sinkhorn", **({"dino_overflow": overflow} if overflow else {})}, device,
         args.json)
    plot(rows, "balanced_sinkhorn", args.plot, f"balanced_sinkhorn, B=1, K=19, T=3, fp32, {device}")


if __name__ == "__main__":
    main()
