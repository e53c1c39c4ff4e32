// The previous generation's CUDA Sinkhorn kernel (kernel_generation.h): CPSL_OPS_CUDA_KERNELS=
// previous, and any K above the current kernel's lane per class (sinkhorn_kernels.cuh). Its passes
// take a warp per row (previous/sinkhorn_passes.cuh); phases, merges and the two launch paths are
// both generations' (sinkhorn_common.cuh). Auto launches it cooperatively wherever the device
// allows, its blocks then walking several chunks each. Scores are re-read on every pass; at CPSL's
// size (8 x 65,792 x 19, 40 MB in fp32) they fit in the L2 of an H100 (50 MB).
#pragma once
#include <cstdint>

#include "../sinkhorn_common.cuh"
#include "cpsl_ops/cuda_launch.cuh"
#include "sinkhorn_passes.cuh"

namespace cpsl_ops {
namespace sinkhorn_kernels {
namespace previous {

template <int kClassesPerLane, typename scalar_t, typename acc_t>
__device__ void run_phase(const SinkhornArgs<scalar_t, acc_t>& a, int64_t phase,
                          Scratch<kClassesPerLane, acc_t>& scratch) {
  if (is_merge(phase)) {
    run_merge_phase(a, phase);
    return;
  }
  const int64_t chunks = a.batch * a.chunks_per_problem;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    if (phase == 0) {
      column_logsumexp_pass(a, chunk, scratch);
    } else if (phase == num_phases(a.num_iters) - 1) {
      row_softmax_pass<true>(a, chunk, scratch);
    } else {
      row_softmax_pass<false>(a, chunk, scratch);
    }
  }
}

template <bool kCooperative, int kClassesPerLane, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(cuda::kThreads, 2)
    sinkhorn_kernel(SinkhornArgs<scalar_t, acc_t> a, int64_t first_phase, int64_t end_phase) {
  __shared__ Scratch<kClassesPerLane, acc_t> scratch;
  run_phases<kCooperative>(a, first_phase, end_phase,
                           [&](int64_t phase) { run_phase<kClassesPerLane>(a, phase, scratch); });
}

template <int kClassesPerLane, typename scalar_t, typename acc_t>
void launch_layout(const SinkhornArgs<scalar_t, acc_t>& args, const LaunchOptions& options, cudaStream_t stream) {
  launch_phases(args,
                PhaseKernels<scalar_t, acc_t>{sinkhorn_kernel<true, kClassesPerLane, scalar_t, acc_t>,
                                              sinkhorn_kernel<false, kClassesPerLane, scalar_t, acc_t>,
                                              cuda::kThreads, 1, false},
                options, stream);
}

// The phases of every problem, in the register layout that fits K (or the wide one).
template <typename scalar_t, typename acc_t>
void launch_sinkhorn_phases(const SinkhornArgs<scalar_t, acc_t>& args, const LaunchOptions& options,
                            cudaStream_t stream) {
  if (args.classes <= cuda::kWarp) {
    launch_layout<1>(args, options, stream);
  } else if (args.classes <= 2 * cuda::kWarp) {
    launch_layout<2>(args, options, stream);
  } else if (args.classes <= 4 * cuda::kWarp) {
    launch_layout<4>(args, options, stream);
  } else if (args.classes <= kMaxClassesPerLane * cuda::kWarp) {
    launch_layout<kMaxClassesPerLane>(args, options, stream);
  } else {
    launch_layout<kWide>(args, options, stream);
  }
}

}  // namespace previous
}  // namespace sinkhorn_kernels
}  // namespace cpsl_ops
