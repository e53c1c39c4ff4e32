"""tools/wheel_policy.py on a tiny synthetic wheel: the report, the retag, and the checks that must fail.

The libraries are compiled here with ``cc`` (skipped without one) from a C file that calls ``exp``,
so they import versioned glibc symbols like the real ones; nothing of cpsl_ops is built.
"""

from __future__ import annotations

import base64
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import load_wheel_policy

MACHINE = platform.machine()

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux" or MACHINE not in ("x86_64", "aarch64"), reason="ELF on x86_64/aarch64 Linux only"),
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc)"),
]


wheel_policy = load_wheel_policy()
TOOL = Path(wheel_policy.__file__)


def glibc_version() -> tuple[int, ...]:
    name = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"
    match = re.fullmatch(r"glibc (\d+)\.(\d+).*", name)
    if match is None:
        pytest.skip(f"not glibc: {name!r}")
    return int(match.group(1)), int(match.group(2))


def compile_library(tmp_path: Path, name: str, source: str, *link: str) -> Path:
    c_file = tmp_path / f"{name}.c"
    c_file.write_text(source)
    output = tmp_path / f"{name}.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(output), str(c_file), *link], check=True, capture_output=True)
    return output


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(folder: Path, library: Path, platform_tag: str = f"linux_{MACHINE}") -> Path:
    """toy-0.1-cp39-abi3-PLATFORM.whl holding toy/_lib.so, with a valid RECORD."""
    dist_info = "toy-0.1.dist-info"
    files = {
        "toy/__init__.py": b"",
        "toy/_lib.so": library.read_bytes(),
        f"{dist_info}/METADATA": b"Metadata-Version: 2.1\nName: toy\nVersion: 0.1\n",
        f"{dist_info}/WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: cp39-abi3-{platform_tag}\n"
        ).encode(),
    }
    record = [record_line(name, data) for name, data in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"toy-0.1-cp39-abi3-{platform_tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


EXP_SOURCE = "#include <math.h>\ndouble toy_exp(double x) { return exp(x); }\n"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    library = compile_library(folder, "libtoy", EXP_SOURCE, "-lm")
    return folder, library, make_wheel(folder, library)


def expected_exp_glibc() -> str:
    # exp got a new symbol version, GLIBC_2.29, with glibc 2.29's rewrite; before it: 2.2.5 (x86_64)
    # or 2.17 (aarch64, the first glibc for it).
    if glibc_version() >= (2, 29):
        return "2.29"
    return "2.2.5" if MACHINE == "x86_64" else "2.17"


def test_show_reports_the_glibc_versions(toy, capsys):
    folder, library, wheel = toy
    assert wheel_policy.main(["show", str(wheel)]) == 0
    out = capsys.readouterr().out
    assert "toy/_lib.so" in out and "libm.so.6" in out
    exp_version = expected_exp_glibc()
    assert re.search(rf"GLIBC\s+highest {re.escape(exp_version)}\s+\(exp\)", out), out

    report = wheel_policy.analyse([wheel], [], {}, None)
    assert report.highest["GLIBC"] == exp_version and not report.failures
    assert report.policy.glibc >= wheel_policy.version_key(exp_version)[:2]
    assert report.platform_tag == f"{report.policy.name}_{MACHINE}"
    # a plain .so gives the same report
    assert wheel_policy.analyse([library], [], {}, None).highest == report.highest


def test_repair_retags_the_wheel(toy, tmp_path, capsys):
    pytest.importorskip("wheel")
    folder, library, wheel = toy
    before = wheel.read_bytes()
    out = tmp_path / "out"
    assert wheel_policy.main(["repair", str(wheel), "--out", str(out)]) == 0
    tag = wheel_policy.analyse([wheel], [], {}, None).platform_tag
    assert tag.startswith("manylinux_")
    (repaired,) = out.glob("*.whl")
    assert repaired.name == f"toy-0.1-cp39-abi3-{tag}.whl"
    assert f"Tag: cp39-abi3-{tag}" in zipfile.ZipFile(repaired).read("toy-0.1.dist-info/WHEEL").decode()
    assert wheel.read_bytes() == before  # the input wheel is left as it was
    capsys.readouterr()
    assert wheel_policy.main(["show", "--require-tag", str(repaired)]) == 0
    assert wheel_policy.main(["show", "--require-tag", str(wheel)]) == 1  # still linux_*
    assert "--require-tag" in capsys.readouterr().out


def test_a_glibc_version_above_the_maximum_fails(toy, capsys):
    folder, library, wheel = toy
    # every x86_64 glibc symbol version is at least 2.2.5, every aarch64 one at least 2.17
    assert wheel_policy.main(["show", str(wheel), "--max-glibc", "2.2"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: GLIBC_" in out and "above --max-glibc 2.2" in out and "exp" in out
    assert wheel_policy.main(["repair", str(wheel), "--out", str(folder / "never"), "--max-glibc", "2.2"]) == 1
    assert not (folder / "never").exists()
    assert wheel_policy.main(["show", str(wheel), "--max-glibc", "99.0", "--max-glibcxx", "3.4.99"]) == 0


def test_a_library_outside_the_whitelist_fails(tmp_path, capsys):
    planted = compile_library(tmp_path, "libplanted", "int planted(void) { return 1; }\n")
    assert planted.name == "libplanted.so"
    user = compile_library(
        tmp_path, "libuser", "int planted(void);\nint user(void) { return planted(); }\n", f"-L{tmp_path}", "-lplanted"
    )
    wheel = make_wheel(tmp_path, user)
    assert wheel_policy.main(["show", str(wheel)]) == 1
    assert "needs libplanted.so: not on the" in capsys.readouterr().out
    assert wheel_policy.main(["repair", str(wheel), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()
    assert wheel_policy.main(["show", str(wheel), "--allow-external", "libplanted*"]) == 0


def test_torch_libraries_are_allowed(tmp_path):
    # named like torch's own library: needed, not shipped, allowed
    fake_torch = compile_library(tmp_path, "libtorch_cpu", "int aoti_torch_fake(void) { return 0; }\n")
    user = compile_library(
        tmp_path, "libuser", "int aoti_torch_fake(void);\nint user(void) { return aoti_torch_fake(); }\n",
        f"-L{tmp_path}", "-ltorch_cpu",
    )  # fmt: skip
    assert fake_torch.name == "libtorch_cpu.so"
    report = wheel_policy.analyse([user], [], {}, None)
    assert report.external == {str(user): ["libtorch_cpu.so"]} and not report.failures


def test_a_wheel_tagged_older_than_its_libraries_fails(toy, tmp_path, capsys):
    folder, library, _ = toy
    if expected_exp_glibc() != "2.29":
        pytest.skip("exp has no glibc 2.29 version here")
    wheel = make_wheel(tmp_path, library, f"manylinux_2_28_{MACHINE}")
    assert wheel_policy.main(["show", str(wheel)]) == 1
    assert f"tagged manylinux_2_28_{MACHINE} but the libraries need manylinux_2_31" in capsys.readouterr().out
    assert wheel_policy.main(["show", str(wheel), "--policy", "manylinux_2_28"]) == 1


def test_the_policy_table_is_monotonic():
    # each policy allows at least what the one before it allows (PEP 600: newer glibc, superset)
    for older, newer in zip(wheel_policy.POLICIES, wheel_policy.POLICIES[1:]):
        assert older.glibc < newer.glibc and older.whitelist <= newer.whitelist and older.extra <= newer.extra
        for family in wheel_policy.FAMILIES:
            if older.ceilings[family]:
                assert wheel_policy.version_key(older.ceilings[family]) <= wheel_policy.version_key(newer.ceilings[family])


def test_command_line(toy):
    folder, library, wheel = toy
    result = subprocess.run([sys.executable, str(TOOL), "show", str(wheel), "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert '"platform_tag": "manylinux_' in result.stdout
