#!/usr/bin/env bash
# Runs every CUDA kernel of the project under the GPU simulator (GPGPU-Sim, functional mode) and
# checks it against the fp64 reference: one line per check, last "gpusim: N/M kernel checks pass",
# non-zero exit when short.
#
#     bash tests/gpusim/run.sh [--filter REGEX]
#
# The kit is $CPSL_GPUSIM_KIT, else ../shared/gpusim beside this repository or beside the one it
# was cloned from (CI runs in a clone); without it this prints one line and exits 0, unless
# CPSL_GPUSIM_REQUIRED=1 (CI), where that is a failure. What it builds, in
# ${CPSL_GPUSIM_BUILD:-build/gpusim}:
#   the simulator       the kit's build.sh (once per machine, 3-4 minutes, cached outside the tree)
#   sim_ops.ptx         sim_ops.cu to PTX by the project's nvcc, with the ops' device flags, less the
#                       cooperative Sinkhorn kernel (grid.sync() does not parse: its phases run
#                       per pass here, the same device code)
#   sim_ops             sim_ops.cu's host side (the ops' launch code) by nvcc, linked by g++ against
#                       the simulator's CUDA runtime and the few entry points it lacks (sim_runtime.cpp)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
origin=$(git -C "$root" remote get-url origin 2>/dev/null || true)
kit=${CPSL_GPUSIM_KIT:-$root/../shared/gpusim}
if [[ -z "${CPSL_GPUSIM_KIT:-}" && ! -x "$kit/build.sh" && -d "$origin" ]]; then
  kit=$origin/../shared/gpusim
fi
if [[ ! -x "$kit/build.sh" ]]; then
  if [[ "${CPSL_GPUSIM_REQUIRED:-0}" == 1 ]]; then
    echo "gpusim: no simulator kit at $kit (set CPSL_GPUSIM_KIT), and CPSL_GPUSIM_REQUIRED=1" >&2
    exit 1
  fi
  echo "gpusim: skipped, no simulator kit at $kit (set CPSL_GPUSIM_KIT to run the kernel checks)"
  exit 0
fi
python=${PYTHON:-python3}
build=${CPSL_GPUSIM_BUILD:-$root/build/gpusim}
mkdir -p "$build"

sim_home=$("$kit/build.sh" | tail -n 1)
torch_include=$("$python" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
# The ops' own device flags (setup.py, through torch's CUDAExtension), for compute_75: the oldest
# architecture CUDA 13 targets, whose PTX the simulator reads.
flags=(-O3 -std=c++17 --expt-relaxed-constexpr -arch=compute_75 -D__CUDA_NO_HALF_OPERATORS__
  -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -I"$root/csrc/include" -I"$root/csrc/cuda" -I"$torch_include")
nvcc=${CUDA_HOME:+$CUDA_HOME/bin/}nvcc
start=$SECONDS
nvcc_log=$build/nvcc.log
"$nvcc" -ptx "${flags[@]}" "$here/sim_ops.cu" -o "$build/sim_ops.full.ptx" > "$nvcc_log" 2>&1 &
ptx_job=$!
"$nvcc" -c "${flags[@]}" "$here/sim_ops.cu" -o "$build/sim_ops.o" >> "$nvcc_log" 2>&1 \
  || { cat "$nvcc_log" >&2; exit 1; }
wait "$ptx_job" || { cat "$nvcc_log" >&2; exit 1; }
"$python" "$kit/drop_entries.py" "$build/sim_ops.full.ptx" "$build/sim_ops.ptx" 'sinkhorn_kernelILb1E' 2> /dev/null
g++ -c -O2 -I"$sim_home/cuda11/include" "$here/sim_runtime.cpp" -o "$build/sim_runtime.o"
g++ "$build/sim_ops.o" "$build/sim_runtime.o" -o "$build/sim_ops" -L"$sim_home/cuda11/lib64" -l:libcudart.so.11.0
echo "gpusim: built sim_ops in $((SECONDS - start)) s"

"$python" "$here/check_kernels.py" --kit "$kit" --ptx "$build/sim_ops.ptx" --runner "$build/sim_ops" \
  --jobs "$(nproc)" "$@"
