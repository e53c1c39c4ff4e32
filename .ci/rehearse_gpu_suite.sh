#!/usr/bin/env bash
# Rehearses the one-call GPU check on this machine (no GPU):
#
#     bash .ci/rehearse_gpu_suite.sh WHEEL
#
# in a bare environment like the GPU machine's: a fresh virtual environment with torch, pytest and
# hypothesis only (no numpy, no torchvision, no trainer dependency), and a copy of the working tree
# as the device tool carries it (tracked files and untracked ones git does not ignore: no compiled
# library, no dist/) with WHEEL copied into its dist/. Runs `bash benchmarks/gpu_suite.sh rehearse`
# there and fails when it fails, printing the logs of the steps that did.
#
# PYTHON (default python3) makes the environment; TORCH_REQUIREMENT (default torch==2.13.0, the
# CPU build on local disk) is its torch, e.g. torch==2.11.0 for the GPU machine's.
set -euo pipefail
if [[ $# -ne 1 || ! -f "$1" ]]; then
  echo "usage: bash .ci/rehearse_gpu_suite.sh WHEEL (a cpsl_ops-*-abi3-*.whl)" >&2
  exit 2
fi
wheel=$(realpath "$1")
repo=$(cd "$(dirname "$0")/.." && pwd)
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT

"${PYTHON:-python3}" -m venv "$workdir/venv"
if ! "$workdir/venv/bin/pip" install --disable-pip-version-check "${TORCH_REQUIREMENT:-torch==2.13.0}" pytest hypothesis \
    > "$workdir/pip.log" 2>&1; then
  cat "$workdir/pip.log"
  exit 1
fi
for absent in numpy torchvision PIL tqdm yaml png; do
  if "$workdir/venv/bin/python" -c "import $absent" 2>/dev/null; then
    echo "rehearsal: $absent is installed, so the environment is not bare" >&2
    exit 1
  fi
done

mkdir -p "$workdir/copy/dist"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf -) |
  tar -xf - -C "$workdir/copy"
cp "$wheel" "$workdir/copy/dist/"

if ! OUT="$workdir/out" PYTHON="$workdir/venv/bin/python" bash "$workdir/copy/benchmarks/gpu_suite.sh" rehearse; then
  for log in "$workdir"/out/gpu_*.log; do
    step=$(basename "$log" .log)
    if grep -q "^${step#gpu_}: exit [1-9]" "$workdir/out/gpu_summary.log"; then
      echo "::: $log (last 40 lines)"
      tail -n 40 "$log"
    fi
  done
  exit 1
fi
