"""CUDA compatibility of the kernels (cpsl_ops/_cuda_compat.py, the checks in cpsl_ops/_loader.py):
the build record, the binary-compatibility rule, and the one warning of each condition that keeps
the CUDA kernels off a device (a torch of another CUDA major, a failed load, an old driver, a GPU
whose architecture the library has no code for), simulated without a GPU by replacing the record,
torch.version.cuda and the two queries of the machine (driver version, device capability)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

import cpsl_ops
from cpsl_ops import _cuda_compat, _loader
from cpsl_ops._cuda_compat import SDIST_COMMAND, BuiltFor, covering_code

RELEASE = ("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")  # the wheels' TORCH_CUDA_ARCH_LIST, 12.0+PTX
CUDA0 = torch.device("cuda", 0)


# --- the rule ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("archs, ptx, capability, expected", [
    # built 7.5;8.0;9.0+PTX
    (("7.5", "8.0", "9.0"), ("9.0",), (7, 5), ("7.5", False)),
    (("7.5", "8.0", "9.0"), ("9.0",), (8, 6), ("8.0", False)),   # SASS of the same major, older minor
    (("7.5", "8.0", "9.0"), ("9.0",), (8, 9), ("8.0", False)),
    (("7.5", "8.0", "9.0"), ("9.0",), (9, 0), ("9.0", False)),
    (("7.5", "8.0", "9.0"), ("9.0",), (10, 0), ("9.0", True)),   # PTX, compiled by the driver
    (("7.5", "8.0", "9.0"), ("9.0",), (12, 0), ("9.0", True)),
    (("7.5", "8.0", "9.0"), ("9.0",), (7, 0), None),             # older than every code
    (("7.5", "8.0", "9.0"), ("9.0",), (6, 1), None),
    # built 8.0;9.0 without PTX
    (("8.0", "9.0"), (), (8, 6), ("8.0", False)),
    (("8.0", "9.0"), (), (10, 0), None),                        # SASS never crosses a major
    (("8.0", "9.0"), (), (7, 0), None),
    (("8.0", "9.0"), (), (7, 5), None),
    # a SASS of a newer minor does not run on an older one
    (("8.6",), (), (8, 0), None),
    (("8.6",), ("8.6",), (8, 0), None),
    # arch-specific (a) code runs on its own capability only, family (f) code on the family
    (("9.0a",), (), (9, 0), ("9.0a", False)),
    (("9.0a",), (), (9, 1), None),
    (("9.0", "9.0a"), (), (9, 0), ("9.0a", False)),
    ((), ("10.0a",), (10, 0), ("10.0a", True)),
    ((), ("10.0a",), (10, 3), None),
    (("10.0f",), (), (10, 3), ("10.0f", False)),
    (("10.0f",), (), (11, 0), None),
    ((), ("10.0f",), (10, 3), ("10.0f", True)),
    ((), ("10.0f",), (12, 0), None),
    # the release list: Orin (8.7) and GB300 (10.3) by SASS, Thor (11.0) not at all, 12.1 by SASS
    (RELEASE, ("12.0",), (8, 7), ("8.6", False)),
    (RELEASE, ("12.0",), (10, 3), ("10.0", False)),
    (RELEASE, ("12.0",), (11, 0), None),
    (RELEASE, ("12.0",), (12, 1), ("12.0", False)),
    (RELEASE, ("12.0",), (13, 0), ("12.0", True)),
])
def test_compatibility_rule(archs, ptx, capability, expected):
    assert covering_code(capability, archs, ptx) == expected


# --- the record --------------------------------------------------------------------------------------


def test_archs_from_torchs_nvcc_flags(monkeypatch):
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;8.0;9.0+PTX")
    assert _cuda_compat.archs_from_nvcc_flags(_get_cuda_arch_flags()) == (("7.5", "8.0", "9.0"), ("9.0",))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a;Ampere;12.0+PTX")  # Ampere: 8.0 and 8.6+PTX
    assert _cuda_compat.archs_from_nvcc_flags(_get_cuda_arch_flags()) == (
        ("8.0", "8.6", "9.0a", "12.0"), ("8.6", "12.0"))
    flags = ["-gencode=arch=compute_100a,code=[sm_100a,compute_100a]", "-gencode", "arch=compute_75,code=sm_75"]
    assert _cuda_compat.archs_from_nvcc_flags(flags) == (("7.5", "10.0a"), ("10.0a",))
    assert _cuda_compat.archs_from_arch_list("8.0 9.0;10.0f+PTX") == (("8.0", "9.0", "10.0f"), ("10.0f",))


@pytest.mark.parametrize("cuda, archs, ptx", [("13.0", ("7.5", "9.0"), ("9.0",)), (None, (), ())])
def test_record_round_trip(cuda, archs, ptx):
    namespace: dict = {}
    exec(_cuda_compat.record_source(cuda, archs, ptx), namespace)
    assert (namespace["CUDA_VERSION"], namespace["CUDA_ARCHS"], namespace["CUDA_PTX"]) == (cuda, archs, ptx)


def test_build_info_reports_the_record():
    info = cpsl_ops.build_info()
    built = _cuda_compat.built_for()
    assert info["cuda_archs"] == list(built.archs) and info["cuda_ptx"] == list(built.ptx)
    if info["cuda_kernels"] and built.recorded:  # setup.py recorded what it compiled the library with
        assert built.cuda == info["built_with_cuda"] and built.archs
    if built.recorded and built.cuda is None:  # a CPU-only build: nothing to cover
        assert not built.archs and not built.ptx and not info["cuda_kernels"]


def test_import_and_driver_query_initialize_no_cuda():
    code = ("import torch, cpsl_ops; from cpsl_ops import _cuda_compat; cpsl_ops.build_info(); "
            "version = _cuda_compat.driver_cuda_version(); "  # None here (no libcuda.so.1), never raises
            "assert version is None or (len(version) == 2 and version[0] >= 1), version; "
            "assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(__file__))


# --- the checks, simulated ---------------------------------------------------------------------------


class Machine:
    """The driver and GPUs the loader's checks see; counts the device queries."""

    def __init__(self, monkeypatch, driver, gpus, built=BuiltFor("13.0", ("7.5", "8.0", "9.0"), ("9.0",), True)):
        self.gpus, self.queries = gpus, 0
        monkeypatch.setattr(_cuda_compat, "driver_cuda_version", lambda: driver)
        monkeypatch.setattr(_cuda_compat, "cuda_device", self.cuda_device)
        monkeypatch.setattr(_loader, "_BUILT", built)
        monkeypatch.setattr(_loader, "_REQUIRE_NATIVE", False)
        monkeypatch.setattr(_loader, "_NATIVE_KERNELS", frozenset({("similarity", "cuda"), ("similarity", "cpu")}))
        monkeypatch.setattr(_loader, "_usable_cuda_devices", set())
        monkeypatch.setattr(_loader, "_cuda_device_errors", {})
        monkeypatch.setattr(_loader, "_warned_cuda", set())
        monkeypatch.setattr(_loader, "_warned_fallback", set())

    def cuda_device(self, index):
        self.queries += 1
        return self.gpus[index]


def recorded(call):
    """call()'s result and the messages of the RuntimeWarnings it gave (every one, none filtered)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_compatible_machine_is_silent_and_checked_once(monkeypatch):
    machine = Machine(monkeypatch, driver=(13, 0), gpus={0: ("NVIDIA H200", (9, 0)), 1: ("NVIDIA A100", (8, 0))})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert _loader.cuda_kernels_usable(0) and _loader.cuda_kernels_usable(1)
            assert _loader.use_native("similarity", CUDA0)
    assert machine.queries == 2  # once per device, then a set lookup
    assert _loader.cuda_device_problem(0) is None and cpsl_ops.build_info()["cuda_device_errors"] == {}


def test_old_driver(monkeypatch):
    machine = Machine(monkeypatch, driver=(12, 8), gpus={0: ("NVIDIA H100", (9, 0)), 1: ("NVIDIA H100", (9, 0))})
    usable, messages = recorded(lambda: _loader.cuda_kernels_usable(0))
    assert not usable and len(messages) == 1
    message = messages[0]
    assert "the NVIDIA driver supports CUDA 12.8 at most" in message
    assert "built with CUDA 13.0 and need a driver for CUDA 13 (R580 or newer)" in message
    assert "run through the pure-PyTorch reference meanwhile" in message
    assert "update the driver (R580 or newer)" in message and SDIST_COMMAND in message
    assert _loader.cuda_device_problem(0) == message
    # once: not again for this device, nor for the next one (the same driver)
    assert recorded(lambda: (_loader.cuda_kernels_usable(0), _loader.cuda_kernels_usable(1))) == ((False, False), [])
    assert recorded(lambda: _loader.use_native("similarity", CUDA0)) == (False, [])  # the reference runs
    assert cpsl_ops.build_info()["cuda_device_errors"] == {0: message, 1: message}
    assert machine.queries == 0  # the GPU is not even asked
    # CPU tensors keep their kernels
    assert _loader.use_native("similarity", torch.device("cpu"))


def test_gpu_architecture_not_covered(monkeypatch):
    gpus = {0: ("Tesla V100-SXM2-16GB", (7, 0)), 1: ("NVIDIA H200", (9, 0))}
    Machine(monkeypatch, driver=(13, 0), gpus=gpus)
    usable, messages = recorded(lambda: _loader.use_native("similarity", CUDA0))
    assert not usable and len(messages) == 1
    message = messages[0]
    assert "GPU 0 (Tesla V100-SXM2-16GB, compute capability 7.0) is not covered by the CUDA kernels" in message
    assert "machine code (SASS) for compute capability 7.5, 8.0, 9.0 and PTX for 9.0" in message
    assert "CUDA tensors on this GPU run through the pure-PyTorch reference meanwhile" in message
    assert f'TORCH_CUDA_ARCH_LIST="7.0" {SDIST_COMMAND}' in message
    assert "CUDA 13 compiles for compute capability 7.5 and newer only" in message
    assert recorded(lambda: _loader.use_native("similarity", CUDA0)) == (False, [])
    # per device: the H200 beside it runs the kernels, silently
    assert recorded(lambda: _loader.use_native("similarity", torch.device("cuda", 1))) == (True, [])


def test_newer_gpu_without_ptx(monkeypatch):
    Machine(monkeypatch, driver=(13, 0), gpus={0: ("NVIDIA B200", (10, 0))},
            built=BuiltFor("13.0", ("8.0", "9.0"), (), True))
    usable, messages = recorded(lambda: _loader.cuda_kernels_usable(0))
    assert not usable and len(messages) == 1
    assert "GPU 0 (NVIDIA B200, compute capability 10.0) is not covered" in messages[0]
    assert "SASS) for compute capability 8.0, 9.0 and no PTX" in messages[0]
    assert 'TORCH_CUDA_ARCH_LIST="10.0"' in messages[0] and "newer only" not in messages[0]


@pytest.mark.parametrize("driver, usable", [((13, 0), False), ((13, 1), True), ((14, 0), True), (None, True)])
def test_ptx_needs_a_driver_for_the_cuda_that_wrote_it(monkeypatch, driver, usable):
    Machine(monkeypatch, driver=driver, gpus={0: ("NVIDIA B200", (10, 0))}, built=BuiltFor("13.1", ("9.0",), ("9.0",), True))
    result, messages = recorded(lambda: _loader.cuda_kernels_usable(0))
    assert result == usable and len(messages) == (0 if usable else 1)
    if not usable:
        assert "their PTX for 9.0, written by CUDA 13.1, needs a driver for CUDA 13.1 or newer" in messages[0]
        assert "this driver supports CUDA 13.0" in messages[0]


def test_build_without_a_record_still_checks_the_driver(monkeypatch):
    Machine(monkeypatch, driver=(12, 4), gpus={0: ("GPU", (6, 0))}, built=BuiltFor(None, (), (), recorded=False))
    monkeypatch.setattr(_loader, "_cuda_module", types.SimpleNamespace(cuda_version="13.0"))
    usable, messages = recorded(lambda: _loader.cuda_kernels_usable(0))
    assert not usable and "supports CUDA 12.4 at most" in messages[0]
    monkeypatch.setattr(_cuda_compat, "driver_cuda_version", lambda: (13, 0))
    monkeypatch.setattr(_loader, "_cuda_device_errors", {})
    assert recorded(lambda: _loader.cuda_kernels_usable(0)) == (True, [])  # no arch list: not checked


def test_require_native_raises_at_every_call(monkeypatch):
    Machine(monkeypatch, driver=(13, 0), gpus={0: ("Tesla P100", (6, 0))})
    monkeypatch.setattr(_loader, "_REQUIRE_NATIVE", True)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"GPU 0 \(Tesla P100, compute capability 6.0\) is not covered"):
            _loader.use_native("similarity", CUDA0)


def test_native_backend_names_the_reason(monkeypatch):
    Machine(monkeypatch, driver=(12, 2), gpus={0: ("NVIDIA L4", (8, 9))})
    with cpsl_ops.use_backend("native"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"cannot run on cuda:0: .*driver supports CUDA 12.2 at most"):
            _loader.use_native("similarity", CUDA0)
    with cpsl_ops.use_backend("reference"):
        assert recorded(lambda: _loader.use_native("similarity", CUDA0)) == (False, [])


@pytest.mark.parametrize("good", [True, False])
def test_compiled_code_takes_the_decision_as_a_constant(monkeypatch, good):
    """torch.compile runs the check once while tracing (it is not traceable: ctypes, device queries)
    and keeps the answer: fullgraph tracing does not break on it."""
    machine = Machine(monkeypatch, driver=(13, 0), gpus={0: ("GPU", (9, 0) if good else (7, 0))})

    def step(x):
        return x + 1 if _loader.use_native("similarity", CUDA0) else x - 1

    torch._dynamo.reset()
    try:
        compiled = torch.compile(step, fullgraph=True, backend="eager")
        (first, second), messages = recorded(lambda: (compiled(torch.zeros(2)), compiled(torch.ones(2))))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(first, torch.full((2,), 1.0 if good else -1.0))
    torch.testing.assert_close(second, torch.full((2,), 2.0 if good else 0.0))
    assert machine.queries == 1 and len(messages) == (0 if good else 1)


# --- at import: torch's CUDA, the load -------------------------------------------------------------


def test_torch_of_another_cuda_major(monkeypatch):
    built = BuiltFor("13.0", ("7.5", "8.0", "9.0"), ("9.0",), True)
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu126")
    monkeypatch.setattr(_loader, "_REQUIRE_NATIVE", False)
    monkeypatch.setattr(_loader, "_import_native", lambda name: pytest.fail("must not load the CUDA library"))
    monkeypatch.setattr(sys.modules["importlib.util"], "find_spec", lambda name: object())
    (module, reason, warned), messages = recorded(lambda: _loader._load_cuda(built))
    assert module is None and warned and reason == "built with CUDA 13.0, torch uses CUDA 12.6"
    assert len(messages) == 1
    message = messages[0]
    assert "the CUDA kernels were built with CUDA 13.0, but this torch (2.11.0+cu126) uses CUDA 12.6" in message
    assert "CUDA tensors run through the pure-PyTorch reference meanwhile" in message
    assert "install a torch built for CUDA 13, with a driver for CUDA 13 (R580 or newer), or build" in message
    assert "(CUDA 12.x, as this torch's)" in message and SDIST_COMMAND in message
    monkeypatch.setattr(_loader, "_REQUIRE_NATIVE", True)
    with pytest.raises(ImportError, match="uses CUDA 12.6"):
        _loader._load_cuda(built)


def test_after_the_import_warning_cuda_ops_fall_back_silently(monkeypatch):
    """The state a torch of another CUDA major leaves: no CUDA kernels, one warning given already."""
    monkeypatch.setattr(_loader, "_NATIVE_KERNELS", frozenset({("similarity", "cpu")}))
    monkeypatch.setattr(_loader, "_cuda_warned", True)
    monkeypatch.setattr(_loader, "_cuda_load_error", "built with CUDA 13.0, torch uses CUDA 12.6")
    monkeypatch.setattr(_loader, "_warned_fallback", set())
    assert recorded(lambda: _loader.use_native("similarity", CUDA0)) == (False, [])
    with cpsl_ops.use_backend("native"), pytest.raises(RuntimeError, match=r"cuda tensors .*torch uses CUDA 12.6"):
        _loader.use_native("similarity", CUDA0)


def test_same_cuda_major_loads(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    monkeypatch.setattr(sys.modules["importlib.util"], "find_spec", lambda name: object())
    sentinel = types.ModuleType("cpsl_ops._C_cuda")
    monkeypatch.setattr(_loader, "_import_native", lambda name: (sentinel, None))
    assert recorded(lambda: _loader._load_cuda(BuiltFor("13.0", ("9.0",), (), True))) == ((sentinel, None, False), [])


def test_failed_load_names_the_cuda_library(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch, "__version__", "2.12.0+cu128")
    monkeypatch.setattr(_loader, "_REQUIRE_NATIVE", False)
    monkeypatch.setattr(sys.modules["importlib.util"], "find_spec", lambda name: object())
    error = "ImportError: libcudart.so.13: cannot open shared object file: No such file or directory"
    monkeypatch.setattr(_loader, "_import_native", lambda name: (None, error))
    (module, reason, warned), messages = recorded(lambda: _loader._load_cuda(BuiltFor("12.8", ("9.0",), (), True)))
    assert module is None and warned and reason == error and len(messages) == 1
    message = messages[0]
    assert "the CUDA kernels (built with CUDA 12.8) failed to load under torch 2.12.0+cu128 (CUDA 12.8)" in message
    assert "It names libcudart.so.13, a library of CUDA 13, where this torch has CUDA 12.8." in message
    assert "run through the pure-PyTorch reference meanwhile" in message and SDIST_COMMAND in message
