#!/usr/bin/env bash
# The whole GPU verification in one command, for a machine with a CUDA GPU (e.g. the device
# tool's H100/H200): build the extension in place against that machine's torch, run the test
# suite (the CUDA tests run where a GPU is present), compute-sanitizer memcheck and racecheck over
# every kernel, and both benchmarks with --device cuda. Logs and JSON go to $OUT (default
# benchmarks/results/); the last lines printed are a summary.
#
#     bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export CPSL_OPS_FORCE_CUDA=1 CPSL_OPS_REQUIRE_NATIVE=1 CPSL_OPS_EXPECT_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python=${PYTHON:-python3}
gpu=$($python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
summary=()

$python setup.py build_ext --inplace > "$out/gpu_build.log" 2>&1
summary+=("build: exit $?")
$python -m pytest tests -q -p no:cacheprovider > "$out/gpu_tests_$gpu.log" 2>&1
summary+=("tests: exit $? ($(tail -n 1 "$out/gpu_tests_$gpu.log"))")
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 3 $python benchmarks/sanitize_kernels.py \
    > "$out/gpu_${tool}_$gpu.log" 2>&1
  summary+=("compute-sanitizer $tool: exit $? ($(grep -m1 'ERROR SUMMARY' "$out/gpu_${tool}_$gpu.log"))")
done
$python benchmarks/bench_sinkhorn.py --device cuda --json "$out/sinkhorn_$gpu.json" > "$out/gpu_bench_sinkhorn_$gpu.log" 2>&1
summary+=("bench_sinkhorn: exit $?")
$python benchmarks/bench_ops.py --device cuda --json "$out/ops_$gpu.json" > "$out/gpu_bench_ops_$gpu.log" 2>&1
summary+=("bench_ops: exit $?")

grep -A 200 "^balanced_sinkhorn on" "$out/gpu_bench_sinkhorn_$gpu.log" | grep "8x65792x19 T=3 fp32" | head -8
grep -A 30 "^cpsl_ops on" "$out/gpu_bench_ops_$gpu.log" | tail -18
printf '%s\n' "${summary[@]}"
