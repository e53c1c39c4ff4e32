#!/usr/bin/env bash
# Release wheels of cpsl-ops: the CUDA wheel and the CPU-only wheel (both cp39-abi3), each retagged
# with the manylinux policy its libraries meet (tools/wheel_policy.py), in OUTDIR/cuda and OUTDIR/cpu
# (the two wheels have the same file name).
#
#   tools/build_wheels.sh OUTDIR [--arch-list "7.5;8.0;..."] [-- WHEEL_POLICY_CHECKS...]
#
#   --arch-list   TORCH_CUDA_ARCH_LIST of the CUDA wheel. Default: $TORCH_CUDA_ARCH_LIST if set, else
#                 the release list below: sm_75 to sm_120 as cubins (a cubin also runs on later minor
#                 versions of its major: 8.7/8.8, 10.3, 12.1) and PTX of compute_120 for the driver to
#                 compile for newer GPUs. nvcc 13.0 builds all of them (nvcc --list-gpu-code).
#   after --      passed to `wheel_policy.py repair`, e.g. -- --policy manylinux_2_28 (what CI
#                 requires) or -- --max-glibc 2.28 --max-glibcxx 3.4.24; a failed check fails the build.
#
# Run it in the environment the wheels are built against (torch 2.14.1 with CUDA 13, nvcc, the
# `build` and `wheel` packages): the build is `python -m build --wheel --no-isolation` from this
# repository, as .ci/run does, and reuses ./build (ninja recompiles what changed flags).
# CPSL_OPS_CPU_FLAGS defaults to "" here (portable x86-64 CPU kernels: a wheel runs on CPUs without
# AVX2, as torch does); set it to e.g. "-mavx2 -mfma" to build for AVX2 machines only.
set -euo pipefail

RELEASE_ARCH_LIST="7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

[[ $# -ge 1 && $1 != -* ]] || usage
outdir=$1
shift
arch_list=${TORCH_CUDA_ARCH_LIST:-$RELEASE_ARCH_LIST}
checks=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --arch-list) [[ $# -ge 2 ]] || usage; arch_list=$2; shift 2 ;;
    --arch-list=*) arch_list=${1#*=}; shift ;;
    --) shift; checks=("$@"); break ;;
    *) usage ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
python -c "import build, wheel, torch" || { echo "build_wheels: needs the build, wheel and torch packages" >&2; exit 1; }
command -v nvcc > /dev/null || { echo "build_wheels: nvcc not on the PATH (the CUDA wheel needs a CUDA toolkit)" >&2; exit 1; }
export CPSL_OPS_CPU_FLAGS=${CPSL_OPS_CPU_FLAGS-}

raw=$(mktemp -d "$outdir/.raw.XXXXXX")
trap 'rm -rf "$raw"' EXIT

echo "::: CUDA wheel (TORCH_CUDA_ARCH_LIST=$arch_list, CPSL_OPS_CPU_FLAGS='$CPSL_OPS_CPU_FLAGS')"
start=$SECONDS
env -u CPSL_OPS_FORCE_CPU CPSL_OPS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch_list" \
  python -m build --wheel --no-isolation --outdir "$raw/cuda"
echo "CUDA wheel built in $((SECONDS - start)) s"

echo "::: CPU-only wheel"
start=$SECONDS
env -u CPSL_OPS_FORCE_CUDA CPSL_OPS_FORCE_CPU=1 python -m build --wheel --no-isolation --outdir "$raw/cpu"
echo "CPU wheel built in $((SECONDS - start)) s"

python - "$raw"/cuda/*.whl "$raw"/cpu/*.whl <<'PY'
import sys
import zipfile

cuda, cpu = (set(zipfile.ZipFile(path).namelist()) for path in sys.argv[1:3])
assert len(sys.argv) == 3, sys.argv
assert {"cpsl_ops/_C.abi3.so", "cpsl_ops/_C_cuda.abi3.so"} <= cuda, sorted(cuda)
assert "cpsl_ops/_C.abi3.so" in cpu and "cpsl_ops/_C_cuda.abi3.so" not in cpu, sorted(cpu)
PY

for kind in cuda cpu; do
  echo "::: $kind wheel: policy and retag"
  rm -f "$outdir/$kind"/cpsl_ops-*.whl
  python tools/wheel_policy.py repair "$raw/$kind"/cpsl_ops-*.whl --out "$outdir/$kind" ${checks[@]+"${checks[@]}"}
  python tools/wheel_policy.py show --require-tag "$outdir/$kind"/cpsl_ops-*.whl > /dev/null
done

echo "::: wheels"
for wheel in "$outdir"/cuda/cpsl_ops-*.whl "$outdir"/cpu/cpsl_ops-*.whl; do
  echo "$(du -k "$wheel" | cut -f1) KiB  ${wheel#"$outdir"/}"
done
