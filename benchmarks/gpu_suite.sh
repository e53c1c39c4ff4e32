#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with a CUDA GPU (e.g. the device tool's
# H100/H200, where it must end inside 7 minutes in quick mode), and its rehearsal on one without:
#
#     bash benchmarks/gpu_suite.sh [quick|full|rehearse]        (default: quick)
#
# It needs python3 (or $PYTHON) with torch >= 2.11, pytest and hypothesis, and the cpsl-ops wheel in
# dist/, built beforehand where there is a CUDA toolkit: the GPU machine may have no compiler, and
# this suite never compiles. dist/ is git-ignored, so carry it along (carry=["dist"] in the device tool):
#     CPSL_OPS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python -m build --wheel --no-isolation --outdir dist
# The wheel's libraries need no more of the system than torch's own wheels (manylinux_2_28: CI checks
# it), the CUDA runtime of a torch built for their CUDA major, and a driver for that CUDA (R580 or
# later for CUDA 13).
#
# Steps ([GPU]: quick and full only; rehearse names them as skipped):
#  1. install: the newest wheel in dist/ into a scratch site folder (pip --target, no index, no
#     dependencies). Every Python step runs in a scratch folder with that site folder first on
#     PYTHONPATH, so that the source tree (no compiled libraries) cannot shadow the wheel.
#  2. preflight (benchmarks/gpu_suite.py): the symbol versions the wheel's libraries need against
#     this machine's glibc and libstdc++, the driver, GPU, torch and CUDA versions, into
#     $OUT/env.json; imports cpsl_ops and checks that it came from the wheel; quick and full also
#     need a GPU, the CUDA kernels and a driver for their CUDA, and launch one kernel.
#  3. collect: the test list, collected by pytest, which also checks where cpsl_ops came from.
#     quick: the tests with "cuda" in their id in the op test files (no trainer test: a bare GPU
#     machine lacks the trainer's dependencies); full: every test (the trainer's need the examples
#     extra: torchvision, Pillow, tqdm, PyYAML, pypng).
#  4. tests [GPU]: the list, with a small hypothesis budget in quick mode.
#  5. sanitizer_TOOL [GPU, where compute-sanitizer exists; it ships with the CUDA toolkit, not
#     torch]: memcheck (without the caching allocator), racecheck, synccheck and initcheck over
#     benchmarks/sanitize_kernels.py, which checks every result against the reference.
#  6. bench_sinkhorn [GPU] (full: and bench_ops): --device cuda; quick: CPSL's size and 16 times
#     it. Without a C compiler (Triton's launchers need one) there are no torch.compile'd rows.
#  7. bench_generations [GPU]: both generations of the CUDA kernels (CPSL_OPS_CUDA_KERNELS=current
#     and previous) per op at CPSL's size and 16 times it; which wins, and whether they agree.
# rehearse runs steps 1 to 3 as quick mode does, then benchmarks/sanitize_kernels.py on the CPU
# kernels and the benchmarks' arguments through --check-args; .ci/rehearse_gpu_suite.sh runs it in
# a bare environment in CI, so that the one call on a GPU machine does not trip over its set-up.
#
# Every step has a time limit and writes its log to $OUT/gpu_STEP.log (default OUT:
# benchmarks/results) as it runs; each step that ends adds a line to $OUT/gpu_summary.log, which is
# printed last. A failed install, preflight or collection stops the suite; the exit status is 1
# if any step failed.
set -uo pipefail
mode=${1:-quick}
if [[ "$mode" != quick && "$mode" != full && "$mode" != rehearse ]]; then
  echo "usage: bash benchmarks/gpu_suite.sh [quick|full|rehearse]" >&2
  exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$repo/benchmarks/results}
mkdir -p "$out" && out=$(cd "$out" && pwd)
summary="$out/gpu_summary.log"
rm -f "$out"/gpu_*.log "$out/env.json"  # an earlier run's, which this summary must not quote
: > "$summary"
python=${PYTHON:-python3}
export CPSL_OPS_REQUIRE_NATIVE=1 CPSL_OPS_EXPECT_CUDA=1 PYTHONUNBUFFERED=1

# Seconds per step. Quick mode's sum to 400 s, and with a budget no step gets more than what is
# left of it, so a step that overruns (or ignores its TERM for the 5 s before KILL) shortens the
# steps after it instead of the check overrunning its 7 minutes.
declare -A limit=([install]=20 [preflight]=30 [collect]=25 [tests]=100 [sanitizer_memcheck]=45
                  [sanitizer_racecheck]=45 [sanitizer_synccheck]=25 [sanitizer_initcheck]=30 [bench_sinkhorn]=45
                  [bench_generations]=35)
budget=0
for step in "${!limit[@]}"; do budget=$((budget + limit[$step])); done
if ((budget > 400)); then
  echo "gpu_suite.sh: quick mode's step limits add up to $budget s, over its 400 s" >&2
  exit 2
fi
case $mode in
  full) limit+=([install]=60 [preflight]=60 [collect]=60 [tests]=900 [sanitizer_memcheck]=120
                [sanitizer_racecheck]=120 [sanitizer_synccheck]=60 [sanitizer_initcheck]=90 [bench_sinkhorn]=400
                [bench_generations]=120 [bench_ops]=300)
        budget=0 ;;
  rehearse) limit+=([sanitize_script_cpu]=90 [bench_sinkhorn_args]=30 [bench_generations_args]=30) ;;
esac

note() { echo "$*" >> "$summary"; }
failed=() skipped=() stopped=

# run NAME COMMAND...: COMMAND in the scratch folder, its output to $out/gpu_NAME.log; a summary line
# with its exit status (124: out of time) and duration, then its "gpu_suite: " lines.
run() {
  local name=$1 seconds=${limit[$1]} start=$SECONDS status
  shift
  if ((budget)) && ((seconds > budget - SECONDS)); then seconds=$((budget - SECONDS)); fi
  if ((seconds <= 0)); then
    note "$name: not run: quick mode's $budget s are spent"
    failed+=("$name")
    return 1
  fi
  (cd "$scratch/run" && timeout --kill-after=5 "$seconds" "$@") > "$out/gpu_$name.log" 2>&1
  status=$?
  note "$name: exit $status in $((SECONDS - start)) s$( ((status == 124)) && echo " (out of time: limit $seconds s)")"
  sed -n 's/^gpu_suite: /  /p' "$out/gpu_$name.log" >> "$summary"
  ((status == 0)) || failed+=("$name")
  return $status
}

# gpu_run NAME COMMAND...: run, except in rehearse, where the step is only named as skipped.
gpu_run() {
  if [[ $mode == rehearse ]]; then
    skipped+=("$1")
  else
    run "$@"
  fi
}

finish() {
  local status=0
  if [[ $mode == rehearse ]] && ((${#skipped[@]})); then note "skipped (need a GPU): ${skipped[*]}"; fi
  if ((${#failed[@]})) || [[ -n $stopped ]]; then
    note "$mode mode FAILED${failed[*]:+ (${failed[*]})}"
    status=1
  else
    note "$mode mode passed"
  fi
  cat "$summary"
  exit $status
}

# stop WHY: the steps after this one cannot run.
stop() {
  note "stopped: $*"
  stopped=1
  finish
}

note "mode $mode; $(date -u +%FT%TZ); commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(
  ((budget)) && echo "; quick mode's step limits add up to $budget s")"
wheels=$(ls -t "$repo"/dist/cpsl_ops-*-abi3-*.whl 2>/dev/null)
wheel=$(head -n 1 <<< "$wheels")
if [[ -z "$wheel" ]]; then
  stop "no cpsl-ops wheel in $repo/dist/. This suite installs one and never compiles (the GPU machine
may have no compiler). Build it where there is a CUDA toolkit, then carry dist/ along (carry=[\"dist\"]
in the device tool):
    CPSL_OPS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python -m build --wheel --no-isolation --outdir dist"
fi
note "wheel: $wheel$( (($(wc -l <<< "$wheels") > 1)) && echo " (the newest of $(wc -l <<< "$wheels"))")"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
site=$scratch/site
mkdir -p "$scratch/run"
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null)

run install "$python" -m pip install --no-deps --no-index --disable-pip-version-check --target "$site" "$wheel" ||
  stop "the wheel did not install: $out/gpu_install.log"
preflight=("$python" "$repo/benchmarks/gpu_suite.py" preflight "$site" "$out/env.json" ${sanitizer:+--sanitizer "$sanitizer"})
[[ $mode == rehearse ]] || preflight+=(--gpu)
run preflight "${preflight[@]}" || stop "the preflight's problems above ($out/env.json)"

pytest=("$python" "$repo/benchmarks/gpu_suite.py" pytest "$site" -- -q -p no:cacheprovider)
if [[ $mode == full ]]; then
  tests=("$repo/tests")
else
  export CPSL_OPS_HYPOTHESIS_EXAMPLES=8
  tests=("$repo"/tests/test_{cuda,sinkhorn,similarity,prototype_update,rectify,registration}.py -k cuda)
fi
run collect "${pytest[@]}" --collect-only "${tests[@]}" ||
  stop "the tests were not collected ($out/gpu_collect.log):
$(grep -m 5 '^E ' "$out/gpu_collect.log")"
gpu_run tests "${pytest[@]}" "${tests[@]}"

if [[ -z "$sanitizer" ]]; then
  note "compute-sanitizer not found (it ships with the CUDA toolkit, not torch): no sanitizer steps"
else
  note "compute-sanitizer: $sanitizer"
  for tool in memcheck racecheck synccheck initcheck; do
    if [[ $tool == memcheck ]]; then caching=(PYTORCH_NO_CUDA_MEMORY_CACHING=1); else caching=(-u PYTORCH_NO_CUDA_MEMORY_CACHING); fi
    gpu_run "sanitizer_$tool" env "${caching[@]}" "$sanitizer" --tool "$tool" --error-exitcode 3 \
      "$python" "$repo/benchmarks/sanitize_kernels.py"
    [[ -f "$out/gpu_sanitizer_$tool.log" ]] &&
      note "  $(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY|[Nn]ot supported|Error:' "$out/gpu_sanitizer_$tool.log")"
  done
fi
if [[ $mode == rehearse ]]; then
  run sanitize_script_cpu "$python" "$repo/benchmarks/sanitize_kernels.py" --device cpu
fi

if [[ $mode == full ]]; then
  bench=("$repo/benchmarks/bench_sinkhorn.py" --device cuda --json "$out/sinkhorn_gpu.json")
else
  bench=("$repo/benchmarks/bench_sinkhorn.py" --device cuda --cases "cpsl,cpsl-16x" --json "$out/sinkhorn_gpu.json")
fi
if [[ $mode == rehearse ]]; then
  run bench_sinkhorn_args "$python" "${bench[@]}" --check-args && sed -n '/^would time/,$p' "$out/gpu_bench_sinkhorn_args.log" >> "$summary"
fi
gpu_run bench_sinkhorn "$python" "${bench[@]}"
# Both generations of the CUDA kernels (CPSL_OPS_CUDA_KERNELS) at CPSL's size and 16 times it: one
# "gpu_suite:" line per op and size with the winner, which decides the generation that stays.
generations=("$repo/benchmarks/bench_generations.py" --device cuda --json "$out/generations_gpu.json")
[[ $mode == full ]] || generations+=(--repeats 5 --warmup-s 0.1)
if [[ $mode == rehearse ]]; then
  run bench_generations_args "$python" "${generations[@]}" --check-args &&
    sed -n '/^would time/p' "$out/gpu_bench_generations_args.log" >> "$summary"
fi
gpu_run bench_generations "$python" "${generations[@]}"
if [[ $mode == full ]]; then
  run bench_ops "$python" "$repo/benchmarks/bench_ops.py" --device cuda --json "$out/ops_gpu.json"
  grep -A 40 "^cpsl_ops on" "$out/gpu_bench_ops.log" | tail -n 26 >> "$summary"
fi
if [[ -f "$out/gpu_bench_sinkhorn.log" ]]; then
  grep -E "^note: no compiler|^balanced_sinkhorn +(8|128)x65792x19 T=3 fp32|^CPSL size" "$out/gpu_bench_sinkhorn.log" >> "$summary"
fi
finish
