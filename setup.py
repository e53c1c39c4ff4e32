"""Build of cpsl-ops: ``cpsl_ops._C`` (schemas and CPU kernels, from ``csrc/``) and, with a CUDA
toolkit and a CUDA build of torch, ``cpsl_ops._C_cuda`` (the CUDA kernels, ``csrc/cuda/``).

Both are written against PyTorch's stable ABI (TORCH_TARGET_VERSION below) and Python's limited
API: a wheel is tagged cp39-abi3 and loads under every torch from the target version on. Whether a
GPU is visible does not matter, so CI without a GPU still compiles the CUDA kernels.

Environment switches:
  CPSL_OPS_FORCE_CPU=1        build only the C++ CPU kernels
  CPSL_OPS_FORCE_CUDA=1       fail unless the CUDA kernels are built
  CUDA_HOME                   the toolkit to use (else it is found from ``nvcc`` on the PATH)
  TORCH_CUDA_ARCH_LIST        GPU architectures (default "7.5;8.0;9.0+PTX"); the build records them
                              and nvcc's CUDA version in cpsl_ops/_cuda_build.py, which the loader
                              checks the GPU and the driver against (cpsl_ops/_cuda_compat.py)
  CPSL_OPS_CPU_FLAGS          SIMD flags of the CPU kernels (default: "-mavx2 -mfma" where supported)
  CPSL_OPS_NO_SPILLS=1        fail when a CUDA kernel spills registers (CI; ptxas always warns)
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


def torch_abi_target() -> str:
    """TORCH_TARGET_VERSION of the oldest torch the libraries load under (cpsl_ops/_abi.py says why)."""
    namespace: dict = {}
    exec((ROOT / "cpsl_ops" / "_abi.py").read_text(), namespace)
    major, minor = namespace["TORCH_ABI_TARGET"]
    return f"0x{major:02x}{minor:02x}000000000000"


def cuda_compat():
    """cpsl_ops/_cuda_compat.py, run on its own (it imports only the standard library at the top): the
    format of the record of what the CUDA kernels are built for, which the loader reads."""
    namespace: dict = {"__name__": "cpsl_ops_cuda_compat"}
    exec((ROOT / "cpsl_ops" / "_cuda_compat.py").read_text(), namespace)
    return namespace


def nvcc_release(toolkit: Path) -> str:
    """The toolkit's CUDA version, "13.0", from ``nvcc --version``."""
    output = subprocess.run([str(toolkit / "bin" / "nvcc"), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+)", output)
    if match is None:
        raise RuntimeError(f"cannot read the CUDA version of {toolkit / 'bin' / 'nvcc'}: {output!r}")
    return match.group(1)


def cuda_build_record(toolkit: Path | None) -> str:
    """The text of cpsl_ops/_cuda_build.py: the nvcc release and the SASS and PTX architectures of the
    CUDA kernels (None and none for a build without them). The architectures are the ``-gencode``
    flags torch's build helper gives nvcc for TORCH_CUDA_ARCH_LIST."""
    compat = cuda_compat()
    if toolkit is None:
        return compat["record_source"](None, (), ())
    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags

        archs, ptx = compat["archs_from_nvcc_flags"](_get_cuda_arch_flags())
    except ImportError:  # a private helper of torch: parse the list here if it is gone
        archs, ptx = compat["archs_from_arch_list"](os.environ["TORCH_CUDA_ARCH_LIST"])
    return compat["record_source"](nvcc_release(toolkit), archs, ptx)


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
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    with_cuda = toolkit is not None and torch.version.cuda is not None and bool(cuda_sources)
    if _env_flag("CPSL_OPS_FORCE_CUDA") and not with_cuda:
        raise RuntimeError(
            f"CPSL_OPS_FORCE_CUDA=1 but the CUDA kernels cannot be built: toolkit={toolkit}, "
            f"torch.version.cuda={torch.version.cuda}, CUDA sources={len(cuda_sources)}"
        )

    include_dirs = [str(ROOT / "csrc" / "include")]
    stable_abi = [f"-DTORCH_TARGET_VERSION={torch_abi_target()}"]
    # The C++ standard is the one torch asks for. No trapping math: float selects may then become
    # blends, which lets the kernels' loops vectorize; the kernels never rely on FP exceptions.
    # OpenMP only for its simd pragmas: threads come from torch's own pool (parallel_for). Hidden
    # visibility, as torch's stable headers have: the modules export only their PyInit functions.
    cxx_flags = ["-O3", "-fopenmp-simd", "-fvisibility=hidden", "-fno-trapping-math", "-fno-math-errno", *stable_abi, *cpu_arch_flags()]
    # Both libraries carry csrc/compat/ and export only their PyInit functions, which keeps their
    # imports from the system to what glibc 2.28 and GCC 8's libstdc++ have (manylinux_2_28).
    compat_sources = sorted(glob.glob("csrc/compat/*.cpp"))
    link_args = [f"-Wl,--version-script={ROOT / 'csrc' / 'compat' / 'exports.map'}"]
    # The stable C shim is all the kernels call, so each library links the torch libraries that
    # export it and nothing else (torch's helpers would add libc10 and libtorch).
    extensions = [
        CppExtension(
            "cpsl_ops._C",
            sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/cpu/*.cpp")) + compat_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
            py_limited_api=True,
        )
    ]
    extensions[0].libraries = ["torch_cpu"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        ptxas = "-Xptxas=--warn-on-spills" + (",--warning-as-error" if _env_flag("CPSL_OPS_NO_SPILLS") else "")
        cuda_extension = CUDAExtension(
            "cpsl_ops._C_cuda",
            cuda_sources + compat_sources,
            include_dirs=include_dirs + nvidia_wheel_include_dirs(),
            extra_compile_args={
                "cxx": [*cxx_flags, "-DUSE_CUDA"],
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-DUSE_CUDA", ptxas, *stable_abi],
            },
            extra_link_args=link_args,
            py_limited_api=True,
        )
        # The shared CUDA runtime, libcudart.so.<major>: the one torch's CUDA build loads (from the
        # nvidia-cuda-runtime wheel) before this library, so it needs no search path. The static
        # runtime would import glibc 2.34's pthread and dl symbols; the shared one ties the library
        # to torch builds of its CUDA major, which the loader checks first (torch_mismatch).
        cuda_extension.libraries = ["torch_cpu", "torch_cuda", "cudart"]
        extensions.append(cuda_extension)
    record = cuda_build_record(toolkit if with_cuda else None)
    print(f"cpsl-ops: building {'CPU + CUDA' if with_cuda else 'CPU'} kernels (toolkit: {toolkit})")

    class BuildOnlyTheseExtensions(BuildExtension.with_options(no_python_abi_suffix=False)):
        """Drops libraries of an earlier build in the same tree that this one does not make, so that a
        CPU-only wheel built after a CUDA one holds no CUDA library, and writes the record of what
        the CUDA kernels are built for (cpsl_ops/_cuda_build.py) beside the libraries."""

        def run(self):
            super().run()
            folders = [os.path.join(self.build_lib, "cpsl_ops")]
            if self.inplace:
                folders.append(self.get_finalized_command("build_py").get_package_dir("cpsl_ops"))
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                Path(folder, "_cuda_build.py").write_text(record)
            built = {extension.name.rsplit(".", 1)[1] for extension in self.extensions}
            for path in glob.glob(os.path.join(self.build_lib, "cpsl_ops", "_C*.so")):
                if os.path.basename(path).split(".", 1)[0] not in built:
                    os.remove(path)

    return extensions, {"build_ext": BuildOnlyTheseExtensions}


ext_modules, cmdclass = build_extensions()

setup(
    packages=find_packages(include=["cpsl_ops", "cpsl_ops.*"]),
    package_data={"cpsl_ops": ["py.typed"]},  # PEP 561: the package's type hints are for its users too
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
