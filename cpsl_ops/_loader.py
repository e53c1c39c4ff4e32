"""Loads the native libraries once and decides, per call, which backend runs.

``cpsl_ops._C`` holds the schemas and CPU kernels, ``cpsl_ops._C_cuda`` the CUDA kernels; both
are built on PyTorch's stable ABI, so they load under any torch from the ABI target on. The CUDA
library is imported only under a CUDA build of torch of its CUDA major version (it links torch's
CUDA libraries). Whether the driver and each GPU can run it is checked at the first op on each CUDA
device (:func:`cuda_kernels_usable`, rules in :mod:`cpsl_ops._cuda_compat`), not at import, which
never initializes CUDA. Each problem gives one RuntimeWarning that says what to do, and ops on the
devices concerned run through the pure-PyTorch reference.

Environment switches:
  CPSL_OPS_BACKEND=reference   start with the pure-PyTorch reference backend
  CPSL_OPS_REQUIRE_NATIVE=1    make a failed load an ImportError, and a GPU or driver the CUDA
                               kernels cannot serve a RuntimeError at its first op (CI uses it, so a
                               broken build cannot hide behind the fallback)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import threading
import warnings
from types import ModuleType
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Set, Tuple, TypedDict

import torch

from cpsl_ops import _cuda_compat
from cpsl_ops._abi import TORCH_ABI_TARGET

BACKENDS = ("auto", "native", "reference")
_REQUIRE_NATIVE = os.environ.get("CPSL_OPS_REQUIRE_NATIVE", "0") == "1"


def _torch_release() -> Tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _import_native(name: str) -> Tuple[Optional[ModuleType], Optional[str]]:
    """(module, None) or (None, why it cannot be used)."""
    if _torch_release() < TORCH_ABI_TARGET:
        target = ".".join(map(str, TORCH_ABI_TARGET))
        return None, f"cpsl-ops needs torch >= {target} (its stable-ABI target), this is torch {torch.__version__}"
    try:
        return importlib.import_module(f"cpsl_ops.{name}"), None
    except ImportError as error:  # not built, or a library it needs is missing
        return None, f"{type(error).__name__}: {error}"


def _fail(message: str) -> None:
    if _REQUIRE_NATIVE:
        raise ImportError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load_cuda(built: _cuda_compat.BuiltFor) -> Tuple[Optional[ModuleType], Optional[str], bool]:
    """(module or None, why not, whether a warning said so) for the CUDA library."""
    if torch.version.cuda is None:
        return None, "torch is a CPU-only build", False
    if importlib.util.find_spec("cpsl_ops._C_cuda") is None:
        return None, "this build of cpsl-ops has no CUDA kernels", False
    mismatch = _cuda_compat.torch_mismatch(built, torch.__version__, torch.version.cuda)
    if mismatch is not None:
        _fail(mismatch)
        return None, f"built with CUDA {built.cuda}, torch uses CUDA {torch.version.cuda}", True
    module, error = _import_native("_C_cuda")
    if module is None:
        assert error is not None
        _fail(_cuda_compat.load_failure(built, error, torch.__version__, torch.version.cuda))
        return None, error, True
    return module, None, False


_BUILT = _cuda_compat.built_for()
_native_module, _load_error = _import_native("_C")
_cuda_module: Optional[ModuleType] = None
_cuda_load_error: Optional[str] = None
_cuda_warned = False  # a warning already said why CUDA tensors take the reference
if _native_module is None:
    _fail(
        f"cpsl_ops: the native extension is not available ({_load_error}); every op runs through the "
        "pure-PyTorch reference. Reinstall cpsl-ops for this torch to get the fused kernels."
    )
else:
    _cuda_module, _cuda_load_error, _cuda_warned = _load_cuda(_BUILT)

# The process-wide backend (set_backend) and each thread's use_backend blocks, which override it
# in that thread only, as torch's grad mode is per thread.
_default_backend = os.environ.get("CPSL_OPS_BACKEND", "auto")
_thread_backend = threading.local()
_warned_fallback: Set[Tuple[str, str]] = set()  # (op, device type) pairs already warned of

if _default_backend not in BACKENDS:
    raise ValueError(f"CPSL_OPS_BACKEND must be one of {BACKENDS}, got {_default_backend!r}")


def _registered_kernels() -> FrozenSet[Tuple[str, str]]:
    """(op, device type) pairs with a native kernel, read once: a constant that torch.compile can
    trace, where a dispatcher query per call would break the graph."""
    if _native_module is None:
        return frozenset()
    names = [name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("cpsl_ops::")]
    return frozenset(
        (name, device_type)
        for name in names
        for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"cpsl_ops::{name}", key)
    )


_NATIVE_KERNELS = _registered_kernels()


def native_available() -> bool:
    """Whether the compiled kernels loaded (see :func:`build_info` for why not)."""
    return _native_module is not None


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``cpsl_ops::<op>`` has a native kernel for ``device_type`` ('cpu' or 'cuda')."""
    return (op, device_type) in _NATIVE_KERNELS


class BuildInfo(TypedDict):
    """What :func:`build_info` returns (a plain ``dict`` at run time)."""

    native_available: bool
    load_error: Optional[str]
    cuda_kernels: bool
    cuda_load_error: Optional[str]
    built_with_torch: Optional[str]
    abi_target: Optional[str]
    built_with_cuda: Optional[str]
    cuda_archs: List[str]
    cuda_ptx: List[str]
    cuda_device_errors: Dict[int, str]
    torch: str
    torch_cuda: Optional[str]
    backend: str


def build_info() -> BuildInfo:
    """Facts for bug reports and benchmark records: versions, load status, active backend.

    ``built_with_torch`` is the torch whose headers compiled the libraries, ``abi_target`` the
    oldest torch they load under (its stable ABI), ``torch`` the one running now. ``cuda_archs``
    and ``cuda_ptx`` are the compute capabilities the CUDA kernels hold machine code (SASS) and
    PTX for (empty without CUDA kernels), ``cuda_device_errors`` the CUDA devices found so far that
    the kernels cannot serve (their GPU or the driver), with why; it initializes nothing.
    """
    return {
        "native_available": native_available(),
        "load_error": _load_error,
        "cuda_kernels": _cuda_module is not None,
        "cuda_load_error": _cuda_load_error,
        "built_with_torch": getattr(_native_module, "torch_version", None),
        "abi_target": getattr(_native_module, "abi_target", None),
        "built_with_cuda": getattr(_cuda_module, "cuda_version", None),
        "cuda_archs": list(_BUILT.archs),
        "cuda_ptx": list(_BUILT.ptx),
        "cuda_device_errors": dict(_cuda_device_errors),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "backend": get_backend(),
    }


def get_backend() -> str:
    """The backend in effect in this thread: 'auto' (native where a kernel exists), 'native' or
    'reference'; the innermost :func:`use_backend` block of the thread, else :func:`set_backend`'s."""
    return getattr(_thread_backend, "name", None) or _default_backend


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "native" and not native_available():
        raise RuntimeError(f"cpsl_ops: the native backend is not available ({_load_error})")
    return name


def set_backend(name: str) -> None:
    """Select the process-wide backend: 'auto', 'native' (error if unavailable) or 'reference'.

    Threads inside a :func:`use_backend` block keep that block's backend until it ends.
    """
    global _default_backend
    _default_backend = _checked(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the block with backend ``name`` in this thread only; other threads are unaffected, and
    the thread's previous backend is back on exit (blocks nest)."""
    previous = getattr(_thread_backend, "name", None)
    _thread_backend.name = _checked(name)
    try:
        yield
    finally:
        _thread_backend.name = previous


# The CUDA devices checked so far: those the kernels serve, and those they cannot, with why.
_usable_cuda_devices: Set[int] = set()
_cuda_device_errors: Dict[int, str] = {}
_warned_cuda: Set[str] = set()  # the messages given (a driver problem is one for every device)


def cuda_device_problem(index: int) -> Optional[str]:
    """Why the CUDA kernels cannot run on CUDA device ``index`` (an old driver, or a GPU whose
    architecture the library has no code for), None when they can; checked once per device."""
    if index in _usable_cuda_devices:
        return None
    if index not in _cuda_device_errors:
        built = _BUILT
        if built.cuda is None and _cuda_module is not None:  # a build from before the record
            built = built._replace(cuda=getattr(_cuda_module, "cuda_version", None))
        driver = _cuda_compat.driver_cuda_version()
        problem = _cuda_compat.driver_problem(built, driver)
        if problem is None:
            name, capability = _cuda_compat.cuda_device(index)
            problem = _cuda_compat.device_problem(built, index, name, capability, driver)
        if problem is None:
            _usable_cuda_devices.add(index)
            return None
        _cuda_device_errors[index] = problem
    return _cuda_device_errors[index]


def _cuda_kernels_usable(index: int) -> bool:
    """Whether the CUDA kernels run on CUDA device ``index``: a set lookup once the device is checked;
    the first time, a RuntimeWarning (a RuntimeError under CPSL_OPS_REQUIRE_NATIVE=1) says why not
    (:func:`cuda_device_problem`), once per message."""
    problem = cuda_device_problem(index)
    if problem is None:
        return True
    if _REQUIRE_NATIVE:
        raise RuntimeError(problem)
    if problem not in _warned_cuda:
        _warned_cuda.add(problem)
        warnings.warn(problem, RuntimeWarning, stacklevel=4)
    return False


# torch.compile calls it while tracing and keeps the answer as a constant: the driver and the GPU
# of a device do not change, and its checks (ctypes, device queries) are not traceable.
cuda_kernels_usable: Callable[[int], bool] = torch.compiler.assume_constant_result(  # type: ignore[no-untyped-call]
    _cuda_kernels_usable
)


def use_native(op: str, device: torch.device) -> bool:
    """True when ``op`` should run its native kernel on ``device`` under the active backend.

    Meta tensors take the native op whenever the library loaded: its fake kernel gives their
    shapes (the reference backend's op has the same one). CUDA tensors take it where the driver
    and the GPU can run the kernels (:func:`cuda_kernels_usable`).
    """
    backend = get_backend()
    if backend == "reference":
        return False
    if has_kernel(op, device.type):
        if device.type != "cuda":
            return True
        index = device.index if device.index is not None else torch.cuda.current_device()
        if cuda_kernels_usable(index):
            return True
        if backend == "native":
            raise RuntimeError(f"cpsl_ops: the native {op} kernel cannot run on cuda:{index}: {_cuda_device_errors[index]}")
        return False
    if device.type == "meta" and native_available():
        return True
    if backend == "native":
        why = f" ({_cuda_load_error})" if device.type == "cuda" and _cuda_load_error else ""
        raise RuntimeError(f"cpsl_ops: no native kernel of {op} for {device.type} tensors in this build{why}")
    if native_available() and (op, device.type) not in _warned_fallback and not (device.type == "cuda" and _cuda_warned):
        _warned_fallback.add((op, device.type))
        warnings.warn(
            f"cpsl_ops: this build has no {device.type} kernel for {op}; using the PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
