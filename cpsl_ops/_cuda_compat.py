"""CUDA compatibility of the compiled kernels: what ``cpsl_ops._C_cuda`` was built for, whether this
torch, driver and GPU can run it, and the warnings that say what to do when they cannot.

At build time setup.py runs this file on its own (only the standard library is imported at the top)
to write ``cpsl_ops/_cuda_build.py`` (:func:`record_source`): the nvcc release and the
architectures compiled, as SASS (machine code) and as PTX. :func:`built_for` reads that record;
:mod:`cpsl_ops._loader` applies the rules below (the torch check at import, the driver and GPU checks
at the first op on each CUDA device) and falls back to the pure-PyTorch reference.

The rules (CUDA's binary compatibility): SASS for ``sm_XY`` runs on a GPU of compute capability X.Z
with Z >= Y, the same major only; the arch-specific ``sm_XYa`` only on X.Y itself, the
family-specific ``sm_XYf`` on X.Z with Z >= Y. PTX for ``compute_XY`` is compiled by the driver for
any GPU of capability >= X.Y (``a``/``f`` PTX as their SASS), if the driver knows the PTX of the
toolkit that wrote it (a driver for that CUDA version or newer). A driver runs code of any toolkit
of the CUDA major it supports or an older one (minor-version compatibility).
"""

from __future__ import annotations

import ctypes
import importlib
import re
import sys
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

Capability = Tuple[int, int]

RECORD_MODULE = "cpsl_ops._cuda_build"
SDIST_COMMAND = "pip install --no-binary cpsl-ops --no-build-isolation cpsl-ops"
# The oldest Linux driver branch of each CUDA major: it runs code built by any toolkit of that major.
DRIVER_BRANCH: Dict[int, str] = {11: "R450", 12: "R525", 13: "R580"}
# The oldest compute capability each CUDA major compiles for (CUDA 13 dropped Maxwell to Volta).
OLDEST_CAPABILITY: Dict[int, Capability] = {11: (3, 5), 12: (5, 0), 13: (7, 5)}


class BuiltFor(NamedTuple):
    """What the CUDA library was compiled for, as setup.py recorded it."""

    cuda: Optional[str]  # the nvcc release, "13.0"; None: no CUDA kernels in this build
    archs: Tuple[str, ...]  # SASS, one per compute capability: "7.5", "9.0", "9.0a"
    ptx: Tuple[str, ...]  # PTX, compiled by the driver for newer GPUs: "9.0"
    recorded: bool  # False: no record (a build from before it existed): nothing is checked


# --- the record, written by setup.py --------------------------------------------------------------


def _arch_name(code: str) -> str:
    """'90' -> '9.0', '100a' -> '10.0a', '75' -> '7.5'."""
    match = re.fullmatch(r"(\d+)(\d)([af]?)", code)
    if match is None:
        raise ValueError(f"not a CUDA architecture: {code!r}")
    return f"{match.group(1)}.{match.group(2)}{match.group(3)}"


def archs_from_nvcc_flags(flags: Sequence[str]) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(SASS, PTX) architectures of nvcc ``-gencode`` flags (``arch=compute_90,code=sm_90`` is SASS,
    ``code=compute_90`` PTX, ``code=[sm_90,compute_90]`` both), sorted by capability."""
    sass, ptx = set(), set()
    for flag in flags:
        for codes in re.findall(r"code=\[?([\w,]+)\]?", flag):
            for code in codes.split(","):
                if code.startswith("sm_"):
                    sass.add(_arch_name(code[3:]))
                elif code.startswith("compute_"):
                    ptx.add(_arch_name(code[8:]))
    return tuple(sorted(sass, key=parse_arch)), tuple(sorted(ptx, key=parse_arch))


def archs_from_arch_list(arch_list: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(SASS, PTX) of a TORCH_CUDA_ARCH_LIST such as "7.5;8.0;9.0+PTX" (numeric entries only; setup.py
    uses torch's own parser and this only where that is missing)."""
    sass, ptx = [], []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        match = re.fullmatch(r"(\d+\.\d+[af]?)(\+PTX)?", entry)
        if match:
            sass.append(match.group(1))
            if match.group(2):
                ptx.append(match.group(1))
    return tuple(sorted(set(sass), key=parse_arch)), tuple(sorted(set(ptx), key=parse_arch))


def record_source(cuda: Optional[str], archs: Sequence[str], ptx: Sequence[str]) -> str:
    """The text of ``cpsl_ops/_cuda_build.py`` (a CPU-only build: ``None``, no architectures)."""
    return (
        '"""What cpsl_ops._C_cuda was compiled for: written by setup.py at build time, do not edit."""\n\n'
        f"CUDA_VERSION = {cuda!r}  # the nvcc release; None: this build has no CUDA kernels\n"
        f"CUDA_ARCHS = {tuple(archs)!r}  # SASS (machine code), by compute capability\n"
        f"CUDA_PTX = {tuple(ptx)!r}  # PTX, which the driver compiles for newer GPUs\n"
    )


def built_for() -> BuiltFor:
    """The record setup.py wrote; ``recorded=False`` when there is none."""
    try:
        record = importlib.import_module(RECORD_MODULE)
    except ImportError:
        return BuiltFor(None, (), (), recorded=False)
    cuda = getattr(record, "CUDA_VERSION", None)
    return BuiltFor(
        cuda if isinstance(cuda, str) else None,
        tuple(getattr(record, "CUDA_ARCHS", ())),
        tuple(getattr(record, "CUDA_PTX", ())),
        recorded=True,
    )


# --- the rules -------------------------------------------------------------------------------------


def parse_arch(arch: str) -> Tuple[int, int, str]:
    """'9.0a' -> (9, 0, 'a'); '8.6' -> (8, 6, '')."""
    match = re.fullmatch(r"(\d+)\.(\d+)([af]?)", arch)
    if match is None:
        raise ValueError(f"not a compute capability: {arch!r}")
    return int(match.group(1)), int(match.group(2)), match.group(3)


def release(version: str) -> Tuple[int, int]:
    """'13.0' -> (13, 0); '12.6.3' -> (12, 6)."""
    match = re.match(r"(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"not a CUDA version: {version!r}")
    return int(match.group(1)), int(match.group(2) or 0)


def _runs_on(arch: str, capability: Capability, ptx: bool) -> bool:
    major, minor, variant = parse_arch(arch)
    if variant == "a":
        return (major, minor) == capability
    if variant == "f" or not ptx:
        return major == capability[0] and minor <= capability[1]
    return (major, minor) <= capability


def covering_code(capability: Capability, archs: Sequence[str], ptx: Sequence[str]) -> Optional[Tuple[str, bool]]:
    """The code of the library that runs on a GPU of ``capability``: (arch, False) for SASS, (arch, True)
    for PTX the driver compiles; the newest one; None when nothing runs there."""
    for is_ptx, candidates in ((False, archs), (True, ptx)):
        usable = [arch for arch in candidates if _runs_on(arch, capability, is_ptx)]
        if usable:
            return max(usable, key=parse_arch), is_ptx
    return None


# --- the machine, queried lazily (the loader calls these at the first op on a CUDA device) ---------


def driver_cuda_version() -> Optional[Tuple[int, int]]:
    """The newest CUDA version the installed driver supports, (12, 8) for an R570 driver; None when
    unknown. ``cuDriverGetVersion`` of the driver library needs neither ``cuInit`` nor a context."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            driver = ctypes.CDLL(name)
            version = ctypes.c_int(0)
            if driver.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
                return version.value // 1000, version.value % 1000 // 10
        except (OSError, AttributeError):
            continue
    return None


def cuda_device(index: int) -> Tuple[str, Capability]:
    """The name and compute capability of CUDA device ``index`` (CUDA is initialized by then)."""
    import torch

    return torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)


# --- the messages ----------------------------------------------------------------------------------


def _branch(major: int) -> str:
    return f"a driver for CUDA {major} ({DRIVER_BRANCH[major]} or newer)" if major in DRIVER_BRANCH else f"a driver for CUDA {major}"


def _build_yourself(toolkit: str, arch_list: Optional[str] = None) -> str:
    archs = f'"{arch_list}"' if arch_list else "<your GPUs' compute capabilities, e.g. \"8.6;9.0\">"
    return (f"build cpsl-ops from the sdist against your own CUDA toolkit ({toolkit}): "
            f"CUDA_HOME=<the toolkit> TORCH_CUDA_ARCH_LIST={archs} {SDIST_COMMAND}")


def _code_list(built: BuiltFor) -> str:
    sass = ", ".join(built.archs) or "none"
    ptx = (f" and PTX for {', '.join(built.ptx)} (compiled by the driver for GPUs of compute capability "
           f"{min(built.ptx, key=parse_arch)} and newer)") if built.ptx else " and no PTX"
    return f"machine code (SASS) for compute capability {sass}{ptx}"


def torch_mismatch(built: BuiltFor, torch_version: str, torch_cuda: Optional[str]) -> Optional[str]:
    """The warning when torch's CUDA major is not the kernels' (checked at import), else None."""
    if built.cuda is None or torch_cuda is None:
        return None
    built_major, torch_major = release(built.cuda)[0], release(torch_cuda)[0]
    if built_major == torch_major:
        return None
    return (
        f"cpsl_ops: the CUDA kernels were built with CUDA {built.cuda}, but this torch ({torch_version}) uses "
        f"CUDA {torch_cuda}; the kernels run only beside a torch of their CUDA major version, so CUDA tensors "
        "run through the pure-PyTorch reference meanwhile (CPU tensors keep the native kernels). For the fused "
        f"CUDA kernels, install a torch built for CUDA {built_major}, with {_branch(built_major)}, "
        + "or " + _build_yourself(f"CUDA {torch_major}.x, as this torch's")
        + "."
    )


def load_failure(built: BuiltFor, error: str, torch_version: str, torch_cuda: Optional[str]) -> str:
    """The warning when the CUDA library fails to load (checked at import)."""
    built_with = f"built with CUDA {built.cuda}" if built.cuda else "built for another CUDA"
    hint = ""
    library = re.search(r"lib(cu\w*|nv\w*)\.so\.(\d+)", error)
    if library is not None and library.group(1) == "cuda":
        hint = f" libcuda.so.1 is the NVIDIA driver's: install {_branch(release(built.cuda)[0])}." if built.cuda else ""
    elif library is not None:
        hint = (f" It names lib{library.group(1)}.so.{library.group(2)}, a library of CUDA {library.group(2)}, "
                f"where this torch has CUDA {torch_cuda}.")
    return (
        f"cpsl_ops: the CUDA kernels ({built_with}) failed to load under torch {torch_version} (CUDA "
        f"{torch_cuda}): {error}.{hint} CUDA tensors run through the pure-PyTorch reference meanwhile. For "
        "the fused CUDA kernels, reinstall a cpsl-ops wheel made for this torch's CUDA major version, "
        + "or " + _build_yourself(f"CUDA {torch_cuda}, as this torch's")
        + "."
    )


def driver_problem(built: BuiltFor, driver: Optional[Tuple[int, int]]) -> Optional[str]:
    """The warning when the driver is older than the kernels' CUDA major (at the first CUDA op)."""
    if built.cuda is None or driver is None:
        return None
    built_major = release(built.cuda)[0]
    if driver[0] >= built_major:
        return None
    supported = f"{driver[0]}.{driver[1]}"
    return (
        f"cpsl_ops: the NVIDIA driver supports CUDA {supported} at most, but the CUDA kernels were built with "
        f"CUDA {built.cuda} and need {_branch(built_major)}; CUDA tensors run through the pure-PyTorch reference "
        f"meanwhile. For the fused CUDA kernels, update the driver ({DRIVER_BRANCH.get(built_major, 'a newer one')} "
        "or newer), "
        + "or " + _build_yourself(f"CUDA {supported} or older, with a torch for that CUDA")
        + "."
    )


def device_problem(built: BuiltFor, index: int, name: str, capability: Capability,
                   driver: Optional[Tuple[int, int]]) -> Optional[str]:
    """The warning when GPU ``index`` can run none of the kernels' code (at its first op), else None."""
    if not built.recorded or built.cuda is None:
        return None
    covering = covering_code(capability, built.archs, built.ptx)
    cc = f"{capability[0]}.{capability[1]}"
    gpu = f"GPU {index} ({name}, compute capability {cc})"
    meanwhile = "CUDA tensors on this GPU run through the pure-PyTorch reference meanwhile"
    if covering is not None:
        arch, is_ptx = covering
        if not is_ptx or driver is None or driver >= release(built.cuda):
            return None
        return (
            f"cpsl_ops: {gpu} has no machine code in the CUDA kernels; their PTX for {arch}, written by CUDA "
            f"{built.cuda}, needs a driver for CUDA {built.cuda} or newer to be compiled for it, and this driver "
            f"supports CUDA {driver[0]}.{driver[1]}. {meanwhile}. For the fused CUDA kernels, update the driver, "
            + "or " + _build_yourself("one this driver supports", cc) + "."
        )
    built_major = release(built.cuda)[0]
    oldest = OLDEST_CAPABILITY.get(built_major)
    too_old = (f" (CUDA {built_major} compiles for compute capability {oldest[0]}.{oldest[1]} and newer only: for "
               "this GPU use a torch and a toolkit of an older CUDA)") if oldest and capability < oldest else ""
    return (
        f"cpsl_ops: {gpu} is not covered by the CUDA kernels, which hold {_code_list(built)}; {meanwhile}. "
        "For the fused CUDA kernels on it, "
        + _build_yourself("of torch's CUDA major version", cc) + too_old + "."
    )
