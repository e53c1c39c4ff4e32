#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with a CUDA GPU (e.g. the device tool's
# H100/H200, where it must end inside 7 minutes in quick mode):
#
#     bash benchmarks/gpu_suite.sh [quick|full]        (default: quick)
#
# 1. Install the abi3 wheel found in dist/ (no compiler needed), or else build the extension in
#    place for TORCH_CUDA_ARCH_LIST (default 9.0) with every core.
# 2. Tests: quick runs tests/test_cuda.py and every other test with "cuda" in its id, with a small
#    hypothesis budget; full runs the whole suite.
# 3. compute-sanitizer memcheck (without the caching allocator), racecheck, synccheck and initcheck
#    over benchmarks/sanitize_kernels.py. A machine whose driver refuses the sanitizer is reported
#    in the summary, not fatal.
# 4. Benchmarks with --device cuda: quick runs the Sinkhorn rows at CPSL's size and 16 times it;
#    full runs both benchmark scripts whole.
#
# Every step has a time limit and writes its log under $OUT (default benchmarks/results/) as it
# runs; each finished step appends a line to $OUT/gpu_summary.log, and the summary is printed last.
#
# To carry a wheel to a GPU machine without a compiler or the right torch, build it here first:
#     CPSL_OPS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python -m build --wheel --no-isolation --outdir dist
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-quick}
if [[ "$mode" != quick && "$mode" != full ]]; then
  echo "usage: bash benchmarks/gpu_suite.sh [quick|full]" >&2
  exit 2
fi
out=${OUT:-benchmarks/results}
mkdir -p "$out"
summary="$out/gpu_summary.log"
: > "$summary"
export CPSL_OPS_FORCE_CUDA=1 CPSL_OPS_REQUIRE_NATIVE=1 CPSL_OPS_EXPECT_CUDA=1 PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
python=${PYTHON:-python3}

note() { echo "$*" >> "$summary"; }

# run NAME SECONDS COMMAND...: COMMAND's output to $out/gpu_NAME.log, a summary line with its exit
# status (124: out of time) and duration.
run() {
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  timeout --kill-after=10 "$limit" "$@" > "$out/gpu_$name.log" 2>&1
  status=$?
  note "$name: exit $status in $((SECONDS - start)) s$( ((status == 124)) && echo " (out of time: limit ${limit} s)")"
  return $status
}

note "mode $mode; $(date -u +%FT%TZ); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
note "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)"
note "$($python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1)"

wheel=$(ls dist/cpsl_ops-*-abi3-*.whl 2>/dev/null | head -n 1)
if [[ -n "$wheel" ]]; then
  site=$(mktemp -d)
  run install 120 $python -m pip install --no-deps --no-index --target "$site" "$wheel"
  export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  MAX_JOBS=$(nproc) run build 300 $python setup.py build_ext --inplace
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
run import 60 $python -c "import cpsl_ops, json; print(json.dumps(cpsl_ops.build_info(), default=str))"
note "  $(tail -n 1 "$out/gpu_import.log")"

if [[ "$mode" == quick ]]; then
  CPSL_OPS_HYPOTHESIS_EXAMPLES=8 run tests 100 $python -m pytest tests -q -p no:cacheprovider -k "cuda"
else
  run tests 540 $python -m pytest tests -q -p no:cacheprovider
fi
note "  $(tail -n 1 "$out/gpu_tests.log")"

# Seconds per tool: the sanitized script runs in well under a minute where the sanitizer works.
for tool_limit in memcheck:50 racecheck:50 synccheck:40 initcheck:40; do
  tool=${tool_limit%%:*}
  if [[ $tool == memcheck ]]; then caching=(PYTORCH_NO_CUDA_MEMORY_CACHING=1); else caching=(-u PYTORCH_NO_CUDA_MEMORY_CACHING); fi
  run "sanitizer_$tool" "${tool_limit##*:}" env "${caching[@]}" compute-sanitizer --tool "$tool" --error-exitcode 3 \
    $python benchmarks/sanitize_kernels.py
  note "  $(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY|[Nn]ot supported|Error:' "$out/gpu_sanitizer_$tool.log")"
done

if [[ "$mode" == quick ]]; then
  run bench_sinkhorn 120 $python benchmarks/bench_sinkhorn.py --device cuda --cases cpsl,cpsl-16x \
    --json "$out/sinkhorn_gpu.json"
else
  run bench_sinkhorn 400 $python benchmarks/bench_sinkhorn.py --device cuda --json "$out/sinkhorn_gpu.json"
  run bench_ops 300 $python benchmarks/bench_ops.py --device cuda --json "$out/ops_gpu.json"
  grep -A 30 "^cpsl_ops on" "$out/gpu_bench_ops.log" | tail -n 18 >> "$summary"
fi
grep -E "^balanced_sinkhorn +(8|128)x65792x19 T=3 fp32" "$out/gpu_bench_sinkhorn.log" >> "$summary"
grep "^CPSL size" "$out/gpu_bench_sinkhorn.log" >> "$summary"

cat "$summary"
