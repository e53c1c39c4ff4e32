"""Build of cpsl-ops: one extension, ``cpsl_ops._C``, compiled from ``csrc/``.

The CUDA sources (``csrc/cuda/*.cu``) are compiled when torch is a CUDA build and a CUDA toolkit
is found; whether a GPU is visible does not matter, so CI without a GPU still compiles them.

Environment switches:
  CPSL_OPS_FORCE_CPU=1        build only the C++ CPU kernels
  CPSL_OPS_FORCE_CUDA=1       fail unless the CUDA kernels are built
  CUDA_HOME                   the toolkit to use (else it is found from ``nvcc`` on the PATH)
  TORCH_CUDA_ARCH_LIST        GPU architectures (default "7.5;8.0;9.0+PTX")
  CPSL_OPS_CPU_FLAGS          SIMD flags of the CPU kernels (default: "-mavx2 -mfma" where supported)
  MAX_JOBS                    parallel compile jobs (default: by cores and memory)
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0+PTX"  # CUDA 13 dropped Volta (7.0)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _is_toolkit(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def find_cuda_toolkit() -> Path | None:
    """The real CUDA toolkit: CUDA_HOME if set, else the TOP that ``nvcc --dryrun`` reports.

    ``nvcc`` on the PATH may be a wrapper script outside the toolkit, in which case torch's own
    guess (the grandparent of nvcc) is wrong; nvcc itself knows where it lives.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return Path(os.environ[variable])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dryrun = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
        match = re.search(r"TOP=(\S+)", dryrun.stdout + dryrun.stderr)
        if match and _is_toolkit(Path(match.group(1)).resolve()):
            return Path(match.group(1)).resolve()
    except (OSError, subprocess.SubprocessError):
        pass
    guess = Path(nvcc).resolve().parent.parent
    return guess if _is_toolkit(guess) else None


def nvidia_wheel_include_dirs() -> list[str]:
    """Header folders of the nvidia-* pip wheels that torch depends on (cusparse.h lives there)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for base in spec.submodule_search_locations:
        found += sorted(glob.glob(os.path.join(base, "*", "include")))
    return found


def cpu_arch_flags() -> list[str]:
    """SIMD flags for the CPU kernels: CPSL_OPS_CPU_FLAGS if set, else AVX2 + FMA when the build
    machine has them (the extension is built where it runs; set CPSL_OPS_CPU_FLAGS="" for a
    portable binary)."""
    if "CPSL_OPS_CPU_FLAGS" in os.environ:
        return os.environ["CPSL_OPS_CPU_FLAGS"].split()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        cpu_flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= cpu_flags else []


def default_max_jobs() -> str:
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gib = 8
    return str(max(1, min(os.cpu_count() or 1, int(memory_gib // 4))))


def build_extensions():
    toolkit = None if _env_flag("CPSL_OPS_FORCE_CPU") else find_cuda_toolkit()
    if toolkit is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = str(toolkit)
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", default_max_jobs())
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = toolkit is not None and torch.version.cuda is not None and bool(cuda_sources)
    if _env_flag("CPSL_OPS_FORCE_CUDA") and not with_cuda:
        raise RuntimeError(
            f"CPSL_OPS_FORCE_CUDA=1 but the CUDA kernels cannot be built: toolkit={toolkit}, "
            f"torch.version.cuda={torch.version.cuda}, CUDA sources={len(cuda_sources)}"
        )

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [str(ROOT / "csrc" / "include")]
    # The C++ standard is the one torch asks for. No trapping math: float selects may then become
    # blends, which lets the kernels' loops vectorize; the kernels never rely on FP exceptions.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", *cpu_arch_flags()]
    extension_kwargs = {}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        sources += cuda_sources
        include_dirs += nvidia_wheel_include_dirs()
        cxx_flags.append("-DCPSL_WITH_CUDA")
        extension_kwargs["extra_compile_args"] = {
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-DCPSL_WITH_CUDA", "--expt-relaxed-constexpr"],
        }
        extension_class = CUDAExtension
    else:
        extension_kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        extension_class = CppExtension
    print(f"cpsl-ops: building {'CPU + CUDA' if with_cuda else 'CPU'} kernels (toolkit: {toolkit})")
    extension = extension_class(
        "cpsl_ops._C",
        sources,
        include_dirs=include_dirs,
        extra_link_args=["-fopenmp"],
        **extension_kwargs,
    )
    return [extension], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = build_extensions()

setup(
    packages=find_packages(include=["cpsl_ops", "cpsl_ops.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
