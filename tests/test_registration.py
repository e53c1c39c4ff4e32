"""Op registration: schemas, kernels per device, fake kernels, opcheck, torch.compile, backends."""

import os
import platform
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import cpsl_ops
from cpsl_ops import reference
from cpsl_ops._abi import TORCH_ABI_TARGET
from conftest import BACKENDS, DEVICES, load_wheel_policy, requires_native

OPS = ["similarity", "similarity_backward", "balanced_sinkhorn", "update_prototypes", "rectify_pseudo_labels"]
PUBLIC_OPS = [op for op in OPS if not op.endswith("_backward")]
REFERENCE_OPS = ["balanced_sinkhorn", "update_prototypes", "rectify_pseudo_labels"]  # cpsl_ops_reference::
ROOT = Path(__file__).resolve().parents[1]


@requires_native
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cpu_kernel_and_a_fake_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cpsl_ops::{op}", "CPU")
    assert torch._library.simple_registry.singleton.find(f"cpsl_ops::{op}").fake_impl.kernel is not None


@requires_native
@pytest.mark.skipif(os.environ.get("CPSL_OPS_EXPECT_CUDA") != "1", reason="set CPSL_OPS_EXPECT_CUDA=1 for CUDA builds")
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel(op):
    assert cpsl_ops.build_info()["built_with_cuda"], "the extension was built without CUDA"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cpsl_ops::{op}", "CUDA")


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_every_public_op_has_a_reference_schema_file_and_tests(op):
    assert callable(getattr(reference, op))
    schema_stem = {"similarity": "similarity", "balanced_sinkhorn": "sinkhorn", "update_prototypes":
                   "prototype_update", "rectify_pseudo_labels": "rectify"}[op]
    assert (ROOT / "csrc" / "ops" / f"{schema_stem}.cpp").is_file()
    assert (ROOT / "csrc" / "cpu" / f"{schema_stem}_cpu.cpp").is_file()
    assert (ROOT / "csrc" / "cuda" / f"{schema_stem}_cuda.cu").is_file()
    assert (ROOT / "csrc" / "cuda" / f"{schema_stem}_kernels.cuh").is_file()  # also run by tests/gpusim
    assert (ROOT / "tests" / f"test_{schema_stem}.py").is_file()


def opcheck_cases(device):
    torch.manual_seed(0)
    features = torch.randn(2, 6, 3, 5, dtype=torch.float64, requires_grad=True)
    flat = torch.randn(7, 6, requires_grad=True)
    prototypes64 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    cases = [
        ("similarity", (features, prototypes64, 0.08)),
        ("similarity", (flat, torch.randn(4, 6, requires_grad=True), 0.5)),
        ("similarity_backward", (torch.randn(7, 4), torch.randn(7, 6), torch.randn(4, 6), 0.08)),
        ("similarity", (features, prototypes64, 0.3, "euclidean")),
        ("similarity", (flat, torch.randn(4, 6, requires_grad=True), 1.0, "euclidean")),
        ("similarity_backward", (torch.randn(7, 4), torch.randn(7, 6), torch.randn(4, 6), 0.5, "euclidean")),
        ("balanced_sinkhorn", (torch.randn(3, 20, 5), torch.rand(3, 5) + 0.1, 0.05, 3)),
        ("update_prototypes", (torch.randn(4, 6), torch.randn(2, 6, 3, 5), torch.randint(0, 4, (2, 3, 5)), 0.9, 255)),
        ("rectify_pseudo_labels", (torch.rand(2, 4, 3, 5), torch.randn(2, 4, 3, 5), 0.2, 255)),
    ]
    to_device = lambda a: a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a  # noqa: E731
    return [(op, tuple(to_device(a) for a in args)) for op, args in cases]


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(len(opcheck_cases("cpu"))))
def test_opcheck(device, index):
    op, args = opcheck_cases(device)[index]
    torch.library.opcheck(getattr(torch.ops.cpsl_ops, op).default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", [i for i, (op, _) in enumerate(opcheck_cases("cpu")) if op in REFERENCE_OPS])
def test_opcheck_of_the_reference_ops(device, index):
    op, args = opcheck_cases(device)[index]
    torch.library.opcheck(getattr(torch.ops.cpsl_ops_reference, op).default, args)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
def test_results_are_bit_identical_across_runs(device):
    torch.manual_seed(0)
    features = torch.randn(3, 16, 20, 30, device=device, requires_grad=True)
    prototypes = torch.randn(7, 16, device=device, requires_grad=True)
    labels = torch.randint(0, 7, (3, 20, 30), device=device)
    scores = torch.rand(4, 5000, 7, device=device)

    def run():
        features.grad = prototypes.grad = None
        logits = cpsl_ops.prototype_similarity(features, prototypes)
        distance_logits = cpsl_ops.prototype_similarity(features, prototypes, 0.5, "euclidean")
        (logits.square().sum() + distance_logits.sin().sum()).backward()
        updated = prototypes.detach().clone()
        cpsl_ops.update_prototypes_(updated, features, labels, 0.5)
        return [logits, distance_logits, features.grad, prototypes.grad, updated, cpsl_ops.balanced_sinkhorn(scores, None, 0.05, 5),
                *cpsl_ops.rectify_pseudo_labels(logits.softmax(1), logits)]

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_compiled_functions_match_eager(backend, metric):
    torch._dynamo.reset()  # the backend is read while tracing: no graph of another test's backend
    features = torch.randn(2, 8, 4, 5, requires_grad=True)
    prototypes = torch.randn(3, 8, requires_grad=True)

    def step(f, c):
        logits = cpsl_ops.prototype_similarity(f, c, 0.08, metric)
        scores = logits.detach().permute(0, 2, 3, 1).reshape(2, -1, 3)
        targets = cpsl_ops.balanced_sinkhorn(scores * 0.08)
        return -(targets.reshape(2, 4, 5, 3).permute(0, 3, 1, 2) * logits.log_softmax(1)).sum(1).mean()

    with cpsl_ops.use_backend(backend):
        eager = step(features, prototypes)
        eager.backward()
        eager_grad = prototypes.grad.clone()
        prototypes.grad = None
        # Not "aot_eager": its backward views a gradient of the reference's einsum with strides that
        # eager does not give it (pytorch/pytorch#120035); the decompositions of Inductor avoid that.
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager_decomp_partition")(features, prototypes)
        compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(prototypes.grad, eager_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_ops_take_float_arguments_that_change_between_calls(dynamic, backend):
    # A temperature schedule or an epsilon sweep: torch.compile then traces the float as a symbolic
    # one, which the argument checks must accept (math.isfinite did not) and still check.
    torch._dynamo.reset()
    features, prototypes = torch.randn(2, 8, 4, 5), torch.randn(3, 8)
    labels = torch.randint(0, 3, (2, 4, 5))

    def step(temperature, epsilon, momentum, threshold):
        logits = cpsl_ops.prototype_similarity(features, prototypes, temperature)
        targets = cpsl_ops.balanced_sinkhorn(logits.permute(0, 2, 3, 1).reshape(2, -1, 3) * temperature, epsilon=epsilon)
        updated = prototypes.clone()
        cpsl_ops.update_prototypes_(updated, features, labels, momentum)
        soft = targets.reshape(2, 4, 5, 3).permute(0, 3, 1, 2)
        return logits, targets, updated, *cpsl_ops.rectify_pseudo_labels(soft, logits, threshold)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    with cpsl_ops.use_backend(backend):
        for values in [(0.08, 0.05, 0.9, 0.1), (0.1, 0.07, 0.99, 0.2), (0.2, 0.1, 0.5, 0.3)]:
            for got, want in zip(compiled(*values), step(*values)):
                torch.testing.assert_close(got, want)
        with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match="temperature"):
            compiled(-1.0, 0.05, 0.9, 0.1)


def every_op(features, prototypes, ema, labels, scores):
    """Every public function once: logits, Sinkhorn targets, rectified labels and confidence, and
    the pixel counts of an in-place update of ``ema``."""
    logits = cpsl_ops.prototype_similarity(features, prototypes)
    targets = cpsl_ops.balanced_sinkhorn(scores, epsilon=0.05)
    hard, confidence = cpsl_ops.rectify_pseudo_labels(logits.softmax(1), logits, 0.3)
    counts = cpsl_ops.update_prototypes_(ema, features, labels, 0.9)
    return logits, targets, hard, confidence, counts, cpsl_ops.class_distribution(labels, prototypes.shape[0])


def every_op_inputs():
    torch.manual_seed(0)
    return (torch.randn(2, 8, 4, 5), torch.randn(3, 8), torch.randn(3, 8), torch.randint(0, 3, (2, 4, 5)),
            torch.randn(2, 20, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_functions_raise_value_errors_when_run(backend):
    """Bad values are found when the compiled code runs, as the same ValueError as in eager mode."""
    torch._dynamo.reset()
    compiled = torch.compile(every_op, fullgraph=True, backend="aot_eager")
    with cpsl_ops.use_backend(backend):
        inputs = every_op_inputs()
        for got, want in zip(compiled(*inputs), every_op(*every_op_inputs())):
            torch.testing.assert_close(got, want)
        features, prototypes, ema, labels, scores = every_op_inputs()
        scores[1, 3, 2] = float("nan")
        with pytest.raises(ValueError, match="balanced_sinkhorn: scores have NaN"):
            compiled(features, prototypes, ema, labels, scores)
        features, prototypes, ema, labels, scores = every_op_inputs()
        labels[0, 1, 1] = 7
        with pytest.raises(ValueError, match="labels must lie in"):
            compiled(features, prototypes, ema, labels, scores)
        features, prototypes, ema, labels, scores = every_op_inputs()
        features[1, :, 2, 3] = float("inf")
        with pytest.raises(ValueError, match="rectify_pseudo_labels: soft_pseudo_labels must be finite"):
            compiled(features, prototypes, ema, labels, scores)


class EveryOp(torch.nn.Module):
    """A module that runs every public function, its EMA prototypes a buffer updated in place."""

    def __init__(self, prototypes, ema):
        super().__init__()
        self.prototypes = torch.nn.Parameter(prototypes.clone())
        self.register_buffer("ema", ema.clone())

    def forward(self, features, labels, scores):
        return every_op(features, self.prototypes, self.ema, labels, scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_program_runs_and_matches_eager(backend):
    features, prototypes, ema, labels, scores = every_op_inputs()
    eager, module = EveryOp(prototypes, ema), EveryOp(prototypes, ema)
    with cpsl_ops.use_backend(backend):
        exported = torch.export.export(module, (features, labels, scores))
        expected = eager(features, labels, scores)
    namespace = "cpsl_ops" if backend == "native" else "cpsl_ops_reference"
    called = {str(node.target) for graph in exported.graph_module.modules() if isinstance(graph, torch.fx.GraphModule)
              for node in graph.graph.nodes if node.op == "call_function"}  # no_grad blocks are subgraphs
    assert {f"{namespace}.{op}.default" for op in REFERENCE_OPS} <= called, called
    program = exported.module()
    got = program(features, labels, scores)
    for got_tensor, want in zip(got, expected):
        torch.testing.assert_close(got_tensor, want)
    torch.testing.assert_close(program.ema, eager.ema)  # the in-place update is part of the program
    assert not torch.equal(eager.ema, ema)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_tensor_mode_gives_output_shapes_and_dtypes(backend):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode(), cpsl_ops.use_backend(backend):
        features, prototypes = torch.empty(2, 8, 4, 5, dtype=torch.float16), torch.empty(3, 8)
        ema, labels = torch.empty(3, 8, dtype=torch.float64), torch.empty(2, 4, 5, dtype=torch.long)
        scores = torch.empty(2, 20, 3, dtype=torch.bfloat16)
        outputs = every_op(features, prototypes, ema, labels, scores)
        assert cpsl_ops.balanced_sinkhorn(torch.empty(6, 3)).shape == (6, 3)
        hard, confidence = cpsl_ops.rectify_pseudo_labels(torch.empty(2, 3, 4, 5, dtype=torch.float16),
                                                          torch.empty(2, 3, 4, 5))
    assert all(isinstance(tensor, FakeTensor) for tensor in outputs)
    assert [(tuple(t.shape), t.dtype) for t in outputs] == [
        ((2, 3, 4, 5), torch.float16), ((2, 20, 3), torch.bfloat16), ((2, 4, 5), torch.long),
        ((2, 4, 5), torch.float16), ((3,), torch.long), ((3,), torch.float32)]
    assert hard.dtype == torch.long and confidence.dtype == torch.float32 and confidence.shape == (2, 4, 5)


@requires_native
def test_backend_switches():
    assert cpsl_ops.native_available() and cpsl_ops.build_info()["load_error"] is None
    assert cpsl_ops.get_backend() == "auto"
    with cpsl_ops.use_backend("reference"):
        assert cpsl_ops.get_backend() == "reference"
    assert cpsl_ops.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        cpsl_ops.set_backend("fast")


def _release(version: str):
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())


def test_use_backend_is_per_thread_and_set_backend_process_wide():
    import threading

    inside, seen = threading.Barrier(2), {}

    def worker(name, backend):
        with cpsl_ops.use_backend(backend):
            inside.wait()  # both threads are now in their blocks
            seen[name] = cpsl_ops.get_backend()
            inside.wait()
        seen[f"{name} after"] = cpsl_ops.get_backend()

    threads = [threading.Thread(target=worker, args=("a", "reference")),
               threading.Thread(target=worker, args=("b", "auto"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"a": "reference", "b": "auto", "a after": "auto", "b after": "auto"}

    cpsl_ops.set_backend("reference")
    try:
        other = []
        thread = threading.Thread(target=lambda: other.append(cpsl_ops.get_backend()))
        thread.start()
        thread.join()
        with cpsl_ops.use_backend("auto"):
            assert cpsl_ops.get_backend() == "auto"
        assert other == ["reference"] and cpsl_ops.get_backend() == "reference"
    finally:
        cpsl_ops.set_backend("auto")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_every_op_gives_shapes_on_meta_tensors(backend):
    meta = torch.device("meta")
    features, prototypes = torch.empty(2, 8, 3, 4, device=meta), torch.empty(5, 8, device=meta)
    labels = torch.empty(2, 3, 4, dtype=torch.long, device=meta)
    with cpsl_ops.use_backend(backend):
        assert cpsl_ops.prototype_similarity(features, prototypes).shape == (2, 5, 3, 4)
        assert cpsl_ops.balanced_sinkhorn(torch.empty(2, 10, 5, device=meta), torch.empty(5, device=meta)).shape == (
            2, 10, 5)
        counts = cpsl_ops.update_prototypes_(prototypes, features, labels)
        assert counts.shape == (5,) and counts.dtype == torch.long and counts.is_meta
        hard, confidence = cpsl_ops.rectify_pseudo_labels(torch.empty(2, 5, 3, 4, device=meta),
                                                          torch.empty(2, 5, 3, 4, device=meta))
        assert hard.shape == confidence.shape == (2, 3, 4) and hard.dtype == torch.long
        distribution = cpsl_ops.class_distribution(labels, 5)
        assert distribution.shape == (5,) and distribution.is_meta


def test_build_info_names_the_versions():
    info = cpsl_ops.build_info()
    assert info["torch"] == torch.__version__
    if info["native_available"]:
        target = _release(info["abi_target"])
        assert target == TORCH_ABI_TARGET
        assert _release(info["built_with_torch"]) >= target and _release(torch.__version__) >= target
        assert info["cuda_kernels"] == (info["built_with_cuda"] is not None)


def _native_library_files():
    import importlib.util

    names = ["cpsl_ops._C"] + (["cpsl_ops._C_cuda"] if cpsl_ops.build_info()["cuda_kernels"] else [])
    return [importlib.util.find_spec(name).origin for name in names]


@requires_native
@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("c++filt") is None, reason="needs binutils")
def test_native_libraries_call_torch_only_through_the_stable_c_shim():
    """The ABI contract of the wheel: no C++ symbol of libtorch or libc10, no libtorch_python."""
    import subprocess

    for library in _native_library_files():
        undefined = subprocess.run(["nm", "-D", "--undefined-only", library], capture_output=True, text=True,
                                   check=True).stdout.split()
        cxx = [symbol for symbol in undefined if symbol.startswith("_Z")]
        demangled = subprocess.run(["c++filt"], input="\n".join(cxx), capture_output=True, text=True,
                                   check=True).stdout.splitlines()
        from_torch = [name for name in demangled if re.search(r"\b(c10|at|torch|caffe2)::", name)]
        assert not from_torch, f"{library} imports C++ symbols of torch: {from_torch[:5]}"
        assert any(symbol.startswith(("aoti_torch_", "torch_")) for symbol in undefined), "no stable shim call"
        needed = subprocess.run(["readelf", "-d", library], capture_output=True, text=True).stdout
        assert "libtorch_python" not in needed and "libc10" not in needed, needed


@requires_native
@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"), reason="x86_64 Linux policy")
def test_native_libraries_load_where_torch_does_manylinux_2_28():
    """csrc/compat/ keeps the system symbols the libraries import within torch's own floor, glibc 2.28
    and GCC 8's libstdc++, whatever newer system builds them; only torch's own libraries (the CUDA
    runtime of its CUDA build included) are needed beyond the policy's whitelist."""
    tool = load_wheel_policy()
    libraries = [Path(path) for path in _native_library_files()]
    report = tool.analyse(libraries, [], {}, "manylinux_2_28")
    assert not report.failures, report.failures


def run_fallback_script(lines: str) -> None:
    """Runs ``lines`` in a fresh interpreter that may import cpsl_ops without its native libraries
    (CPSL_OPS_REQUIRE_NATIVE unset) and expects them to print 'fallback ok'."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CPSL_OPS_REQUIRE_NATIVE"}
    result = subprocess.run([sys.executable, "-c", lines + "print('fallback ok')\n"], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_torch_older_than_the_abi_target_falls_back_with_a_warning_naming_it():
    run_fallback_script(
        "import warnings, torch\n"
        "torch.__version__ = '2.10.0'\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import cpsl_ops\n"
        "assert not cpsl_ops.native_available()\n"
        "messages = [str(w.message) for w in caught if 'cpsl_ops' in str(w.message)]\n"
        "assert len(messages) == 1 and 'needs torch >= 2.11' in messages[0] and '2.10.0' in messages[0], messages\n"
    )


def test_extension_missing_falls_back_with_one_warning():
    """In a process where _C cannot be imported, ops run on the reference and say so once."""
    run_fallback_script(
        "import sys, warnings\n"
        "sys.modules['cpsl_ops._C'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import cpsl_ops, torch\n"
        "assert not cpsl_ops.native_available()\n"
        "assert sum('native extension is not available' in str(w.message) for w in caught) == 1\n"
        "out = cpsl_ops.balanced_sinkhorn(torch.randn(5, 3))\n"
        "assert torch.allclose(out.sum(1), torch.ones(5))\n"
    )
