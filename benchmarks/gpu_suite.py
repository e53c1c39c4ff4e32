"""The Python half of benchmarks/gpu_suite.sh: its preflight and its pytest runs.

    python benchmarks/gpu_suite.py preflight SITE ENV_JSON [--gpu] [--sanitizer PATH]
    python benchmarks/gpu_suite.py pytest SITE -- PYTEST_ARGUMENTS...

SITE is the folder the suite installed the wheel into. Lines starting with "gpu_suite: " are the
ones the suite copies into its summary.

preflight tells, before device time goes to tests, whether this machine can load the wheel: it
reads the symbol versions the wheel's libraries need (GLIBC_*, GLIBCXX_*, CXXABI_*, GCC_*; CI keeps
them within manylinux_2_28) and compares them with what this process's glibc and libstdc++ define, records glibc, libstdc++, the driver and the CUDA version it supports,
the GPUs, torch and its CUDA in ENV_JSON, then imports cpsl_ops and checks that it came from SITE
(not from a source tree without compiled libraries). With --gpu it also needs a GPU, the CUDA
kernels loaded, a driver for their CUDA version, and one kernel launched. Every problem is printed
and the exit status is 1, so that the suite stops before tests that cannot run.

pytest runs pytest.main with the arguments and then checks where cpsl_ops came from in that process
(pytest puts folders on sys.path of its own), printing the number of tests collected (after -k)
and their outcomes.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

SUMMARY = "gpu_suite: "
SHT_GNU_VERDEF, SHT_GNU_VERNEED = 0x6FFFFFFD, 0x6FFFFFFE


def elf_sections(data: bytes):
    """(type, offset, link, info) of each section of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        raise ValueError("not a 64-bit little-endian ELF file")
    (table,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    for index in range(count):
        section_type, offset, link, info = struct.unpack_from("<4xI16xQ8xII", data, table + index * entry_size)
        yield section_type, offset, link, info


def elf_string(data: bytes, table: int, index: int) -> str:
    start = table + index
    return data[start:data.index(b"\0", start)].decode()


def version_needs(path: Path) -> Dict[str, Set[str]]:
    """{library file name: the symbol versions ``path`` needs from it} (its .gnu.version_r)."""
    data = path.read_bytes()
    sections = list(elf_sections(data))
    needs: Dict[str, Set[str]] = {}
    for section_type, entry, link, count in sections:
        if section_type != SHT_GNU_VERNEED:
            continue
        strings = sections[link][1]
        for _ in range(count):
            _, aux_count, file_name, aux, following = struct.unpack_from("<HHIII", data, entry)
            names = needs.setdefault(elf_string(data, strings, file_name), set())
            for _ in range(aux_count):
                _, _, _, name, aux_following = struct.unpack_from("<IHHII", data, entry + aux)
                names.add(elf_string(data, strings, name))
                aux += aux_following
            entry += following
    return needs


def version_definitions(path: Path) -> Set[str]:
    """The symbol versions the library ``path`` defines (its .gnu.version_d)."""
    data = path.read_bytes()
    sections = list(elf_sections(data))
    defined: Set[str] = set()
    for section_type, entry, link, count in sections:
        if section_type != SHT_GNU_VERDEF:
            continue
        strings = sections[link][1]
        for _ in range(count):
            _, _, _, _, _, aux, following = struct.unpack_from("<HHHHIII", data, entry)
            defined.add(elf_string(data, strings, struct.unpack_from("<I", data, entry + aux)[0]))
            entry += following
    return defined


def release(version: str) -> tuple:
    """(3, 4, 29) for GLIBCXX_3.4.29 or 3.4.29."""
    return tuple(int(part) for part in re.findall(r"\d+", version.rsplit("_", 1)[-1]))


def newest(versions, family: str) -> Optional[str]:
    """The highest version of ``family`` (GLIBC, GLIBCXX, CXXABI or GCC) among ``versions``."""
    members = [v for v in versions if v.startswith(family + "_") and re.fullmatch(r"[\d.]+", v[len(family) + 1:])]
    return max(members, key=release, default=None)


def mapped_library(name: str) -> Optional[Path]:
    """The file this process maps for the library ``name`` (e.g. libstdc++.so.6), loaded as the
    dynamic loader would load it for the wheel if nothing has loaded it yet."""
    try:
        ctypes.CDLL(name)
    except OSError:
        return None
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]).name.startswith(name):
            return Path(fields[5])
    return None


def check_symbol_versions(site: Path, report: dict, problems: List[str]) -> None:
    """The wheel's libraries' version needs against this machine's glibc and other libraries. glibc's
    are checked against its version, since libc's file name is libc-2.NN.so before 2.34."""
    glibc = os.confstr("CS_GNU_LIBC_VERSION").split()[-1]
    report["glibc"] = glibc
    libraries = report["wheel_libraries"] = {}
    providers = report["system_libraries"] = {}
    for library in sorted((site / "cpsl_ops").glob("*.so")):
        needs = version_needs(library)
        libraries[library.name] = {name: sorted(versions, key=release) for name, versions in needs.items()}
        for name, versions in sorted(needs.items()):
            if name.startswith("libcudart.so") and report["torch_cuda"] is None:
                continue  # torch's CUDA builds bring it; beside a CPU-only torch the CUDA library stays unloaded
            glibc_versions = {v for v in versions if v.startswith("GLIBC_")}
            too_new = sorted((v for v in glibc_versions if release(v) > release(glibc)), key=release)
            if too_new:
                problems.append(f"{library.name} needs {too_new[-1]} from {name}; this machine has glibc {glibc}")
            others = versions - glibc_versions
            if not others:
                continue
            path = mapped_library(name)
            if path is None:
                problems.append(f"{library.name} needs {name}, which this machine's loader does not find")
                continue
            defined = version_definitions(path)
            providers[name] = {"path": str(path), **{family: newest(defined, family) for family in
                                                     ("GLIBCXX", "CXXABI", "GCC") if newest(defined, family)}}
            for version in sorted(others - defined, key=release):
                family = version.split("_")[0]
                problems.append(f"{library.name} needs {version} from {name}; {path} has at most "
                                f"{newest(defined, family) or f'no {family} version'}")


def driver_cuda_version() -> Optional[str]:
    """The CUDA version the installed driver supports (cuDriverGetVersion), if a driver is installed."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if driver.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def nvidia_smi() -> Optional[List[str]]:
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30)
    return [line.strip() for line in (result.stdout or result.stderr).splitlines() if line.strip()]


def from_site(origin: Optional[str], site: Path) -> bool:
    return origin is not None and Path(origin).resolve().is_relative_to(site.resolve())


def write(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def check_gpu(report: dict, problems: List[str]) -> None:
    """What quick and full mode need beyond a loadable wheel: a GPU, the CUDA kernels, a driver for
    their CUDA version, and a kernel that runs."""
    import torch

    import cpsl_ops

    info = report["cpsl_ops"]
    if not torch.cuda.is_available():
        problems.append(f"torch {torch.__version__} sees no GPU (CUDA build: {torch.version.cuda}); "
                        "on a machine without one, run: bash benchmarks/gpu_suite.sh rehearse")
        return
    if not info["cuda_kernels"]:
        problems.append(f"cpsl_ops has no CUDA kernels here: {info['cuda_load_error']}")
        return
    driver, built = report["driver_cuda"], info["built_with_cuda"]
    if driver is not None and release(driver)[:1] < release(built)[:1]:
        problems.append(f"the driver supports CUDA {driver}; the wheel's kernels need a driver for CUDA {built} "
                        "(R580 or later for CUDA 13)")
        return
    try:
        with cpsl_ops.use_backend("native"):
            rows = cpsl_ops.balanced_sinkhorn(torch.rand(2, 100, 3, device="cuda")).sum(-1)
        if not torch.allclose(rows, torch.ones_like(rows)):
            problems.append(f"a CUDA Sinkhorn call's rows do not sum to one: {rows}")
    except (RuntimeError, ValueError) as error:
        problems.append(f"a CUDA kernel failed to run: {error}")


def preflight(site: Path, env_json: Path, gpu: bool, sanitizer: Optional[str]) -> int:
    problems: List[str] = []
    report: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "problems": problems}
    import torch

    report.update(torch=torch.__version__, torch_cuda=torch.version.cuda, driver_cuda=driver_cuda_version(),
                  nvidia_smi=nvidia_smi(), compute_sanitizer=sanitizer)
    if torch.cuda.is_available():
        report["gpus"] = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    check_symbol_versions(site, report, problems)
    write(report, env_json)  # before the import, which a library that cannot load may end abruptly
    spec = importlib.util.find_spec("cpsl_ops")
    report["cpsl_ops_found_at"] = origin = spec.origin if spec else None
    if not from_site(origin, site):
        problems.append(f"cpsl_ops would be imported from {origin}, not from the wheel installed in {site}")
    if not problems:
        try:
            import cpsl_ops
        except ImportError as error:
            problems.append(f"import cpsl_ops failed: {error}")
        else:
            report["cpsl_ops"] = cpsl_ops.build_info()
            if gpu:
                check_gpu(report, problems)
            from harness import compiler_for

            report["c_compiler_for_triton"] = compiler_for(torch.device("cuda"))  # torch.compile'd benchmark rows
        write(report, env_json)
    stdcxx = report.get("system_libraries", {}).get("libstdc++.so.6", {})
    gpus = "; ".join(report["nvidia_smi"] or []) or "no nvidia-smi"
    print(f"{SUMMARY}glibc {report['glibc']}, libstdc++ up to {stdcxx.get('GLIBCXX')}; torch {report['torch']} "
          f"(CUDA {report['torch_cuda']}); GPU, driver: {gpus}; the driver's CUDA {report['driver_cuda']}")
    print(f"{SUMMARY}cpsl_ops from {origin}")
    for problem in problems:
        print(f"{SUMMARY}problem: {problem}")
    return 1 if problems else 0


def run_pytest(site: Path, arguments: List[str]) -> int:
    import pytest

    class Outcomes:
        selected: Optional[int] = None
        counts: Dict[str, int] = {}

        def pytest_collection_finish(self, session) -> None:
            self.selected = len(session.items)

        def pytest_terminal_summary(self, terminalreporter) -> None:
            self.counts = {outcome: len(reports) for outcome, reports in terminalreporter.stats.items()
                           if outcome in ("passed", "failed", "error", "skipped", "deselected")}

    outcomes = Outcomes()
    status = pytest.main(arguments, plugins=[outcomes])
    origin = getattr(sys.modules.get("cpsl_ops"), "__file__", None)
    counts = "".join(f", {count} {outcome}" for outcome, count in outcomes.counts.items())
    print(f"{SUMMARY}{outcomes.selected} tests collected{counts}; cpsl_ops from {origin}")
    if not from_site(origin, site):
        print(f"{SUMMARY}problem: in pytest, cpsl_ops came from {origin}, not from the wheel installed in {site}")
        return 1
    return int(status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("preflight")
    check.add_argument("site", type=Path)
    check.add_argument("env_json", type=Path)
    check.add_argument("--gpu", action="store_true", help="also need a GPU and the CUDA kernels running on it")
    check.add_argument("--sanitizer", default=None, help="the compute-sanitizer the suite found, for the record")
    tests = commands.add_parser("pytest")
    tests.add_argument("site", type=Path)
    tests.add_argument("arguments", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.command == "preflight":
        return preflight(args.site, args.env_json, args.gpu, args.sanitizer)
    return run_pytest(args.site, args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments)


if __name__ == "__main__":
    sys.exit(main())
