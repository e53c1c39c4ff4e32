#!/usr/bin/env bash
# The whole GPU verification in one command, for a machine with a CUDA GPU (e.g. the device
# tool's H100/H200): install the abi3 wheel found in dist/ (built elsewhere against any torch from
# the ABI target on: no compiler needed) or else build the extension in place against that
# machine's torch, run the test suite (the CUDA tests run where a GPU is present),
# compute-sanitizer memcheck and racecheck over every kernel, and both benchmarks with --device
# cuda. Logs and JSON go to $OUT (default benchmarks/results/); the last lines printed are a
# summary.
#
#     bash benchmarks/gpu_suite.sh
#
# To carry a wheel to a GPU machine without a compiler or the right torch, build it here first:
#     CPSL_OPS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python -m build --wheel --no-isolation --outdir dist
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export CPSL_OPS_FORCE_CUDA=1 CPSL_OPS_REQUIRE_NATIVE=1 CPSL_OPS_EXPECT_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
python=${PYTHON:-python3}
gpu=$($python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
summary=()

wheel=$(ls dist/cpsl_ops-*-abi3-*.whl 2>/dev/null | head -n 1)
if [[ -n "$wheel" ]]; then
  site=$(mktemp -d)
  $python -m pip install --quiet --no-deps --no-index --target "$site" "$wheel" > "$out/gpu_build.log" 2>&1
  summary+=("install $(basename "$wheel"): exit $?")
  export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  $python setup.py build_ext --inplace > "$out/gpu_build.log" 2>&1
  summary+=("build: exit $?")
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$python -c "import cpsl_ops; print(cpsl_ops.build_info())" >> "$out/gpu_build.log" 2>&1
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
