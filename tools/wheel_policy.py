#!/usr/bin/env python3
"""Which manylinux policy the native libraries of a cpsl-ops wheel meet, and a wheel tagged with it.

``python tools/wheel_policy.py show WHEEL|LIB.so ... [checks]``   the report; non-zero exit on a failed check
``python tools/wheel_policy.py repair WHEEL --out DIR [checks]``   the same checks, then the wheel retagged
                                                                  manylinux_X_Y_<arch> in DIR

For every ELF shared library (in a wheel: every member that is one) the report lists the DT_NEEDED
libraries and the highest GLIBC_, GLIBCXX_, CXXABI_ and GCC_ symbol versions it imports, with the
symbols that need the newest of them. The policy is the oldest manylinux_X_Y (PEP 600) whose symbol
version ceilings cover all of them; the tag is what pip then checks (the running glibc >= X.Y), so
a wheel tagged this way is refused where it could not load instead of failing at import.

Checks (each failure is reported and makes the exit status 1):
  * every DT_NEEDED library is on the policy's whitelist, the dynamic loader, or torch's own
    (libtorch*, libc10*, and the CUDA runtime libcudart.so.<major> of torch's CUDA builds: they are
    loaded by ``import torch`` before the extension; the wheel does not ship them), or matches an
    --allow-external pattern;
  * --max-glibc / --max-glibcxx / --max-cxxabi: no imported version above the given one;
  * --policy manylinux_X_Y: the libraries meet that policy (e.g. manylinux_2_28, torch's floor);
  * a wheel already tagged manylinux_X_Y must not claim an older X_Y than its libraries need;
  * show --require-tag: each wheel's platform tag is exactly manylinux_X_Y_<arch> of that policy.

The policy table (POLICIES) is auditwheel 6.8.2's ``auditwheel/policy/manylinux-policy.json`` for
x86_64 (pypa/auditwheel, the reference implementation of PEP 600's policies), reduced to the highest
version of each symbol family: in that file every policy's versions of a family are exactly all
the known versions up to its highest one (checked when the table was written), so "at most the
ceiling" is the same test. The lib whitelists are that file's ``lib_whitelist``; the dynamic loader
(ld-linux-*) is always allowed, as auditwheel does. Only the symbol families the policies list are
checked (GLIBC, GLIBCXX, CXXABI, GCC, LIBATOMIC, ZLIB); versions of other libraries (torch has none)
are reported but not limited.

Standard library only: the ELF parsing (64-bit little-endian: x86_64, aarch64) is done here. The
retagging is ``python -m wheel tags`` (the ``wheel`` package, >= 0.40).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# -- manylinux policies (auditwheel 6.8.2, manylinux-policy.json, x86_64) -------------------------

_WHITELIST_BASE = frozenset(
    {
        "libatomic.so.1", "libgcc_s.so.1", "libstdc++.so.6", "libm.so.6", "libanl.so.1",
        "libdl.so.2", "librt.so.1", "libc.so.6", "libnsl.so.1", "libutil.so.1",
        "libpthread.so.0", "libX11.so.6", "libXext.so.6", "libXrender.so.1", "libICE.so.6",
        "libSM.so.6", "libGL.so.1", "libgobject-2.0.so.0", "libgthread-2.0.so.0",
        "libglib-2.0.so.0", "libresolv.so.2", "libz.so.1",
    }
)  # fmt: skip
_WHITELIST_2_12 = _WHITELIST_BASE | {"libexpat.so.1"}
_WHITELIST_2_24 = _WHITELIST_2_12 | {"libmvec.so.1"}


@dataclasses.dataclass(frozen=True)
class Policy:
    glibc: tuple[int, int]
    ceilings: dict[str, str]  # symbol family -> highest allowed version ("" = none allowed)
    whitelist: frozenset[str]
    extra: frozenset[str] = frozenset()  # non-numeric versions allowed (CXXABI_TM_1, ...)

    @property
    def name(self) -> str:
        return f"manylinux_{self.glibc[0]}_{self.glibc[1]}"


def _policy(glibc: str, glibcxx: str, cxxabi: str, gcc: str, zlib: str, libatomic: str, extra: str = "") -> Policy:
    major, minor = (int(x) for x in glibc.split("."))
    whitelist = _WHITELIST_2_24 if (major, minor) >= (2, 24) else _WHITELIST_2_12 if (major, minor) >= (2, 12) else _WHITELIST_BASE
    ceilings = {"GLIBC": glibc, "GLIBCXX": glibcxx, "CXXABI": cxxabi, "GCC": gcc, "ZLIB": zlib, "LIBATOMIC": libatomic}
    return Policy((major, minor), ceilings, whitelist, frozenset(extra.split()))


_FT = "CXXABI_TM_1 CXXABI_FLOAT128"
_RELR = _FT + " GLIBC_ABI_DT_RELR"
POLICIES: tuple[Policy, ...] = (
    #        GLIBC   GLIBCXX   CXXABI    GCC       ZLIB       LIBATOMIC
    _policy("2.5", "3.4.8", "1.3.1", "4.2.0", "", ""),
    _policy("2.12", "3.4.13", "1.3.3", "4.3.0", "1.2.2.4", ""),
    _policy("2.17", "3.4.19", "1.3.7", "4.8.0", "1.2.5.2", "", "CXXABI_TM_1"),
    _policy("2.24", "3.4.22", "1.3.10", "4.8.0", "1.2.5.2", "1.2", _FT),
    _policy("2.26", "3.4.22", "1.3.10", "4.8.0", "1.2.5.2", "1.2", _FT),
    _policy("2.27", "3.4.24", "1.3.11", "7.0.0", "1.2.9", "1.2", _FT),
    _policy("2.28", "3.4.24", "1.3.11", "7.0.0", "1.2.9", "1.2", _FT),
    _policy("2.31", "3.4.28", "1.3.12", "7.0.0", "1.2.9", "1.2", _FT),
    _policy("2.34", "3.4.29", "1.3.13", "7.0.0", "1.2.9", "1.2", _FT),
    _policy("2.35", "3.4.30", "1.3.13", "12.0.0", "1.2.9", "1.2", _FT),
    _policy("2.36", "3.4.30", "1.3.13", "12.0.0", "1.2.9", "1.2", _RELR),
    _policy("2.37", "3.4.30", "1.3.13", "12.0.0", "1.2.12", "1.2", _RELR),
    _policy("2.38", "3.4.30", "1.3.13", "12.0.0", "1.2.12", "1.2", _RELR),
    _policy("2.39", "3.4.33", "1.3.15", "14.0.0", "1.2.12", "1.2", _RELR),
    _policy("2.40", "3.4.33", "1.3.15", "14.0.0", "1.2.12", "1.2", _RELR),
    _policy("2.41", "3.4.33", "1.3.15", "14.0.0", "1.2.12", "1.2", _RELR),
)
FAMILIES = ("GLIBC", "GLIBCXX", "CXXABI", "GCC", "ZLIB", "LIBATOMIC")

# torch's own libraries: loaded by `import torch` (cpsl_ops imports torch before its libraries)
# and found there by soname, so the wheel needs them without shipping them. libcudart.so.<major>
# comes with torch's CUDA builds (the nvidia-cuda-runtime wheel; the loader loads the CUDA library
# only beside a torch of its CUDA major).
TORCH_LIBRARIES = ("libtorch*.so*", "libc10*.so*", "libcudart.so.*")

_MACHINES = {62: "x86_64", 183: "aarch64"}


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def split_version(name: str) -> tuple[str, str] | None:
    """'GLIBC_2.34' -> ('GLIBC', '2.34'); None for a version that is not FAMILY_<numbers>."""
    match = re.fullmatch(r"([A-Z][A-Z0-9]*)_(\d+(?:\.\d+)*)", name)
    return (match.group(1), match.group(2)) if match else None


# -- ELF -------------------------------------------------------------------------------------------

SHT_DYNSYM, SHT_DYNAMIC, SHT_GNU_VERNEED, SHT_GNU_VERSYM = 11, 6, 0x6FFFFFFE, 0x6FFFFFFF
DT_NEEDED, DT_SONAME, DT_RPATH, DT_RUNPATH = 1, 14, 15, 29


@dataclasses.dataclass
class ElfInfo:
    name: str
    machine: str
    soname: str | None
    needed: list[str]
    rpath: list[str]
    # version name ("GLIBC_2.34") -> (library that defines it, undefined symbols bound to it)
    versions: dict[str, tuple[str, list[str]]]


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def parse_elf(data: bytes, name: str) -> ElfInfo:
    if not is_elf(data):
        raise ValueError(f"{name}: not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ValueError(f"{name}: only 64-bit little-endian ELF is supported")
    (e_machine,) = struct.unpack_from("<H", data, 0x12)
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    if e_shoff == 0 or e_shnum == 0:
        raise ValueError(f"{name}: no section headers")
    sections = []
    for i in range(e_shnum):
        _, sh_type, _, _, sh_offset, sh_size, sh_link, sh_info, _, sh_entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, e_shoff + i * e_shentsize
        )
        sections.append((sh_type, sh_offset, sh_size, sh_link, sh_info, sh_entsize))

    def string(table: int, offset: int) -> str:
        start = sections[table][1] + offset
        return data[start : data.index(b"\0", start)].decode("utf-8", "replace")

    needed: list[str] = []
    rpath: list[str] = []
    soname = None
    for sh_type, offset, size, link, _, _ in sections:
        if sh_type != SHT_DYNAMIC:
            continue
        for pos in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == DT_NEEDED:
                needed.append(string(link, value))
            elif tag == DT_SONAME:
                soname = string(link, value)
            elif tag in (DT_RPATH, DT_RUNPATH):
                rpath.append(string(link, value))

    # .gnu.version_r: which library defines each needed version; index (vna_other) -> version
    index_to_version: dict[int, str] = {}
    versions: dict[str, tuple[str, list[str]]] = {}
    for sh_type, offset, _, link, count, _ in sections:
        if sh_type != SHT_GNU_VERNEED:
            continue
        pos = offset
        for _ in range(count):
            _, vn_cnt, vn_file, vn_aux, vn_next = struct.unpack_from("<HHIII", data, pos)
            library = string(link, vn_file)
            aux = pos + vn_aux
            for _ in range(vn_cnt):
                _, _, vna_other, vna_name, vna_next = struct.unpack_from("<IHHII", data, aux)
                version = string(link, vna_name)
                index_to_version[vna_other] = version
                versions.setdefault(version, (library, []))
                aux += vna_next
            pos += vn_next

    # .dynsym + .gnu.version: the undefined symbols bound to each needed version
    versym = next((s for s in sections if s[0] == SHT_GNU_VERSYM), None)
    for sh_type, offset, size, link, _, entsize in sections:
        if sh_type != SHT_DYNSYM or versym is None:
            continue
        for i in range(size // (entsize or 24)):
            st_name, _, _, st_shndx = struct.unpack_from("<IBBH", data, offset + i * (entsize or 24))
            (index,) = struct.unpack_from("<H", data, versym[1] + 2 * i)
            version = index_to_version.get(index & 0x7FFF)
            if st_shndx == 0 and version is not None and st_name:
                versions[version][1].append(string(link, st_name))
    return ElfInfo(name, _MACHINES.get(e_machine, f"machine-{e_machine}"), soname, needed, rpath, versions)


def read_libraries(path: Path) -> tuple[list[ElfInfo], str | None]:
    """The ELF libraries in a wheel (or the given .so file) and the wheel's platform tag(s)."""
    if path.suffix == ".whl":
        infos = []
        with zipfile.ZipFile(path) as wheel:
            for member in wheel.namelist():
                if member.endswith("/"):
                    continue
                with wheel.open(member) as handle:
                    if not is_elf(handle.read(4)):
                        continue
                infos.append(parse_elf(wheel.read(member), member))
        platform = path.name[: -len(".whl")].split("-")[-1]
        return infos, platform
    return [parse_elf(path.read_bytes(), str(path))], None


# -- analysis --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    libraries: list[ElfInfo]
    highest: dict[str, str]  # family -> highest version needed over all libraries
    policy: Policy | None  # the oldest policy that covers every version (None: none does)
    external: dict[str, list[str]]  # library -> DT_NEEDED not on any whitelist
    machine: str | None
    failures: list[str]

    @property
    def platform_tag(self) -> str | None:
        if self.policy is None or self.machine is None:
            return None
        return f"{self.policy.name}_{self.machine}"


def family_versions(info: ElfInfo) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for version in info.versions:
        split = split_version(version)
        if split is not None:
            found.setdefault(split[0], []).append(split[1])
    return {family: sorted(found[family], key=version_key) for family in sorted(found)}


def meets(policy: Policy, versions: set[str]) -> list[str]:
    """The versions (names) that the policy does not allow."""
    bad = []
    for version in sorted(versions):
        split = split_version(version)
        if version in policy.extra:
            continue
        if split is None:
            if version.split("_", 1)[0] in FAMILIES:
                bad.append(version)  # e.g. GLIBC_PRIVATE, or CXXABI_TM_1 before manylinux_2_17
            continue
        family, number = split
        if family not in FAMILIES:
            continue
        ceiling = policy.ceilings[family]
        if not ceiling or version_key(number) > version_key(ceiling):
            bad.append(version)
    return bad


def allowed_external(library: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(library, pattern) for pattern in patterns)


def analyse(
    paths: list[Path], allow: list[str], max_versions: dict[str, str], require: str | None, require_tag: bool = False
) -> Report:
    libraries: list[ElfInfo] = []
    failures: list[str] = []
    platforms: list[str] = []
    for path in paths:
        infos, platform = read_libraries(path)
        if not infos:
            failures.append(f"{path}: no ELF library in it")
        libraries += infos
        if platform:
            platforms.append(platform)
    all_versions = {version for info in libraries for version in info.versions}
    highest: dict[str, str] = {}
    for version in all_versions:
        split = split_version(version)
        if split and (split[0] not in highest or version_key(split[1]) > version_key(highest[split[0]])):
            highest[split[0]] = split[1]
    policy = next((p for p in POLICIES if not meets(p, all_versions)), None)
    if policy is None:
        failures.append("the libraries meet no manylinux policy: " + ", ".join(meets(POLICIES[-1], all_versions)))
    machines = {info.machine for info in libraries}
    machine = next(iter(machines)) if len(machines) == 1 else None
    if len(machines) > 1:
        failures.append(f"libraries of several machines: {sorted(machines)}")
    if machine is not None and machine not in _MACHINES.values():
        failures.append(f"unsupported machine {machine}")

    whitelist = (policy or POLICIES[-1]).whitelist
    external: dict[str, list[str]] = {}
    patterns = [*TORCH_LIBRARIES, *allow]
    for info in libraries:
        outside = [n for n in info.needed if n not in whitelist and not n.startswith(("ld-linux", "ld64.so"))]
        if outside:
            external[info.name] = outside
        bad = [n for n in outside if not allowed_external(n, patterns)]
        if bad:
            failures.append(
                f"{info.name} needs {', '.join(bad)}: not on the {(policy or POLICIES[-1]).name} whitelist nor "
                f"torch's own ({', '.join(TORCH_LIBRARIES)}) nor --allow-external"
            )
    for family, limit in max_versions.items():
        if family in highest and version_key(highest[family]) > version_key(limit):
            culprits = sorted(
                f"{info.name}: {', '.join(sorted(set(info.versions[v][1]))[:6]) or '(no symbol)'}@{v}"
                for info in libraries
                for v in info.versions
                if (s := split_version(v)) and s[0] == family and version_key(s[1]) > version_key(limit)
            )
            failures.append(f"{family}_{highest[family]} is above --max-{family.lower()} {limit}: " + "; ".join(culprits))
    if require is not None:
        wanted = next((p for p in POLICIES if p.name == require), None)
        if wanted is None:
            failures.append(f"--policy {require}: unknown (known: {', '.join(p.name for p in POLICIES)})")
        else:
            bad = meets(wanted, all_versions)
            if bad:
                failures.append(f"the libraries do not meet {require}: they need {', '.join(bad)}")
    # A wheel already tagged manylinux must not claim more than its libraries meet.
    for platform in platforms:
        for tag in platform.split("."):
            match = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", tag)
            legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
            claimed = (int(match.group(1)), int(match.group(2))) if match else None
            if claimed is None and tag.split("_", 1)[0] in legacy:
                claimed = legacy[tag.split("_", 1)[0]]
            if claimed is not None and (policy is None or claimed < policy.glibc):
                failures.append(f"tagged {tag} but the libraries need {policy.name if policy else 'more than any policy'}")
    if require_tag and policy is not None and machine is not None:
        for path, platform in zip(paths, platforms):
            if platform != f"{policy.name}_{machine}":
                failures.append(f"{path.name} is tagged {platform}, not {policy.name}_{machine} (--require-tag)")
    return Report(libraries, highest, policy, external, machine, failures)


def format_report(report: Report, paths: list[Path]) -> str:
    lines = [f"wheel_policy: {', '.join(p.name for p in paths)}"]
    for info in report.libraries:
        lines.append(f"  {info.name} ({info.machine})")
        lines.append(f"    needs: {', '.join(info.needed) or '-'}" + (f"   rpath: {':'.join(info.rpath)}" if info.rpath else ""))
        for family, versions in family_versions(info).items():
            top = versions[-1]
            symbols = sorted(set(info.versions[f"{family}_{top}"][1]))
            shown = ", ".join(symbols[:8]) + (f", ... ({len(symbols)} symbols)" if len(symbols) > 8 else "")
            lines.append(f"    {family:<9} highest {top:<8} ({shown or 'no symbol'})")
        others = sorted(v for v in info.versions if split_version(v) is None)
        if others:
            lines.append(f"    other versions: {', '.join(others)}")
    lines.append("  highest over all: " + ", ".join(f"{f}_{v}" for f, v in sorted(report.highest.items())))
    for name, outside in report.external.items():
        lines.append(f"  outside the whitelist in {name}: {', '.join(outside)}")
    if report.policy is not None:
        lines.append(f"  policy: {report.policy.name} (GLIBC <= {report.policy.ceilings['GLIBC']}, GLIBCXX <= "
                     f"{report.policy.ceilings['GLIBCXX']}, CXXABI <= {report.policy.ceilings['CXXABI']})")  # fmt: skip
        lines.append(f"  platform tag: {report.platform_tag}")
        if report.policy.glibc > (2, 28):
            blockers = meets(next(p for p in POLICIES if p.name == "manylinux_2_28"), set().union(*(i.versions for i in report.libraries)))
            lines.append(f"  short of manylinux_2_28 (torch's floor) by: {', '.join(blockers)}")
    for failure in report.failures:
        lines.append(f"  FAIL: {failure}")
    lines.append("  result: " + ("FAILED" if report.failures else "ok"))
    return "\n".join(lines)


def report_json(report: Report) -> dict:
    return {
        "libraries": {
            info.name: {
                "needed": info.needed,
                "rpath": info.rpath,
                "highest": {family: versions[-1] for family, versions in family_versions(info).items()},
            }
            for info in report.libraries
        },
        "highest": report.highest,
        "policy": report.policy.name if report.policy else None,
        "platform_tag": report.platform_tag,
        "external": report.external,
        "failures": report.failures,
    }


# -- retagging -------------------------------------------------------------------------------------


def retag(wheel: Path, platform_tag: str, out: Path) -> Path:
    """Copy the wheel to OUT with its platform tag replaced (``python -m wheel tags``)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".retag-") as scratch:
        copy = Path(scratch) / wheel.name
        shutil.copy2(wheel, copy)
        result = subprocess.run(
            [sys.executable, "-m", "wheel", "tags", "--remove", "--platform-tag", platform_tag, str(copy)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"python -m wheel tags failed (the wheel package >= 0.40 is needed):\n{result.stderr}")
        produced = Path(scratch) / result.stdout.strip().splitlines()[-1]
        target = out / produced.name
        os.replace(produced, target)
    # The retagged wheel must say so inside too (WHEEL's Tag lines), not only in its name.
    with zipfile.ZipFile(target) as zipped:
        wheel_file = next(n for n in zipped.namelist() if n.endswith(".dist-info/WHEEL"))
        tags = [line.split(":", 1)[1].strip() for line in zipped.read(wheel_file).decode().splitlines() if line.startswith("Tag:")]
    if not tags or any(not tag.endswith("-" + platform_tag) for tag in tags):
        raise RuntimeError(f"{target.name}: WHEEL has tags {tags}, expected *-{platform_tag}")
    return target


# -- command line ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="report the libraries' symbol versions and policy; exit 1 on a failed check")
    show.add_argument("paths", nargs="+", type=Path, help="wheels or ELF shared libraries")
    repair = sub.add_parser("repair", help="check, then write the wheel retagged with the policy it meets")
    repair.add_argument("paths", nargs=1, type=Path, metavar="wheel")
    repair.add_argument("--out", type=Path, required=True, help="folder for the retagged wheel")
    for command in (show, repair):
        command.add_argument("--max-glibc", metavar="X.Y", help="fail if a library needs a newer GLIBC_ version")
        command.add_argument("--max-glibcxx", metavar="3.4.N", help="fail if a library needs a newer GLIBCXX_ version")
        command.add_argument("--max-cxxabi", metavar="1.3.N", help="fail if a library needs a newer CXXABI_ version")
        command.add_argument("--policy", metavar="manylinux_X_Y", help="fail unless the libraries meet this policy")
        command.add_argument("--allow-external", action="append", default=[], metavar="GLOB",
                             help="a DT_NEEDED library outside the whitelist that the wheel may need (repeatable)")  # fmt: skip
        command.add_argument("--json", action="store_true", help="print the report as JSON")
    show.add_argument("--require-tag", action="store_true",
                      help="fail unless each wheel's platform tag is exactly the policy its libraries meet")  # fmt: skip
    args = parser.parse_args(argv)

    max_versions = {
        family: value
        for family, value in (("GLIBC", args.max_glibc), ("GLIBCXX", args.max_glibcxx), ("CXXABI", args.max_cxxabi))
        if value
    }
    for path in args.paths:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    if args.command == "repair" and args.paths[0].suffix != ".whl":
        parser.error("repair takes a wheel")
    require_tag = args.command == "show" and args.require_tag
    if require_tag and any(path.suffix != ".whl" for path in args.paths):
        parser.error("--require-tag takes wheels only")
    report = analyse(args.paths, args.allow_external, max_versions, args.policy, require_tag)
    print(json.dumps(report_json(report), indent=2) if args.json else format_report(report, args.paths))
    if report.failures:
        return 1
    if args.command == "repair":
        assert report.platform_tag is not None
        target = retag(args.paths[0], report.platform_tag, args.out)
        print(f"wheel_policy: wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
