// CUDA kernel of cpsl_ops::balanced_sinkhorn and its torch-free launch (math: sinkhorn_math.h;
// phases, merges and launch paths: sinkhorn_common.cuh; the passes: sinkhorn_passes.cuh; the op:
// sinkhorn_cuda.cu).
//
// Two generations (kernel_generation.h: CPSL_OPS_CUDA_KERNELS, read at each call). Current: for
// K <= 32, a thread per row (sinkhorn_passes.cuh), for the bandwidth floor of 4 reads and 1 write
// of the scores at T = 3; larger K, and previous, take the warp-per-row kernel
// (previous/sinkhorn_kernels.cuh). Auto launches the row kernel cooperatively only when every
// chunk has a resident block (CPSL's size: 520 chunks, 660 blocks on 132 SMs), else per pass (16
// times CPSL's size). Scores are re-read on every pass; at CPSL's size (8 x 65,792 x 19, 40 MB in
// fp32) they fit in the L2 of an H100 or H200 (50 MB).
#pragma once
#include <cmath>
#include <cstdint>

#include "cpsl_ops/cuda_launch.cuh"
#include "cpsl_ops/kernel_generation.h"
#include "cpsl_ops/sinkhorn_math.h"
#include "previous/sinkhorn_kernels.cuh"
#include "sinkhorn_common.cuh"
#include "sinkhorn_passes.cuh"

namespace cpsl_ops {
namespace sinkhorn_kernels {

template <int kClasses, typename scalar_t, typename acc_t>
__device__ void run_row_phase(const SinkhornArgs<scalar_t, acc_t>& a, int64_t phase,
                              RowScratch<kClasses, acc_t>& scratch) {
  if (is_merge(phase)) {
    run_warp_merge_phase(a, phase);
    return;
  }
  const int64_t chunks = a.batch * a.chunks_per_problem;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    if (phase == 0) {
      row_column_logsumexp(a, chunk, scratch);
    } else if (phase == num_phases(a.num_iters) - 1) {
      row_softmax_pass<true>(a, chunk, scratch);
    } else {
      row_softmax_pass<false>(a, chunk, scratch);
    }
  }
}

// Blocks per SM the registers must allow: about 72 + K registers per thread in fp32 (a row's K
// values and the loads in flight), more in fp64 (its exp is a long inlined routine), each the
// fewest that ptxas -v (sm_90) gives without spills. Left free, ptxas spends registers on
// unrolling the short column walks and halves the warps per SM for nothing.
template <int kClasses, typename acc_t>
constexpr int min_row_blocks() {
  const int registers = sizeof(acc_t) == 8 ? (kClasses <= 16 ? 128 : 168) : 72 + kClasses;
  return 65536 / (kRowThreads * registers);
}

template <bool kCooperative, int kClasses, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads, (min_row_blocks<kClasses, acc_t>()))
    row_sinkhorn_kernel(SinkhornArgs<scalar_t, acc_t> a, int64_t first_phase, int64_t end_phase) {
  __shared__ RowScratch<kClasses, acc_t> scratch;
  run_phases<kCooperative>(a, first_phase, end_phase,
                           [&](int64_t phase) { run_row_phase<kClasses>(a, phase, scratch); });
}

template <int kClasses, typename scalar_t, typename acc_t>
void launch_row_kernel(const SinkhornArgs<scalar_t, acc_t>& args, const LaunchOptions& options, cudaStream_t stream) {
  launch_phases(args,
                PhaseKernels<scalar_t, acc_t>{row_sinkhorn_kernel<true, kClasses, scalar_t, acc_t>,
                                              row_sinkhorn_kernel<false, kClasses, scalar_t, acc_t>, kRowThreads,
                                              cuda::kWarp, true},
                options, stream);
}

// The phases of every problem: the row kernel whose registers fit K, or the previous generation's.
template <typename scalar_t, typename acc_t>
void launch_sinkhorn_phases(const SinkhornArgs<scalar_t, acc_t>& args, const LaunchOptions& options,
                            cudaStream_t stream) {
  if (kernel_generation() == KernelGeneration::kPrevious || args.classes > kMaxRowClasses) {
    previous::launch_sinkhorn_phases(args, options, stream);
  } else if (args.classes <= 8) {
    launch_row_kernel<8>(args, options, stream);
  } else if (args.classes <= 16) {
    launch_row_kernel<16>(args, options, stream);
  } else if (args.classes <= 24) {
    launch_row_kernel<24>(args, options, stream);
  } else {
    launch_row_kernel<kMaxRowClasses>(args, options, stream);
  }
}

template <typename scalar_t, typename prior_t>
void launch_balanced_sinkhorn(const SinkhornProblem<scalar_t, prior_t>& p, const LaunchOptions& options,
                              cuda::Workspace& workspace, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  if (p.batch * p.classes == 0) return;
  const int64_t chunks_per_problem = cuda::blocks_for(p.samples, kRowsPerChunk);
  acc_t* log_prior = workspace.take<acc_t>(p.batch * p.classes);
  log_prior_kernel<prior_t, acc_t><<<cuda::blocks_for(p.batch), cuda::kThreads, 0, stream>>>(
      p.prior, p.prior_stride0, p.prior_stride1, p.batch, p.classes, log_prior, p.flags);
  CPSL_KERNEL_LAUNCH_CHECK();
  if (p.samples == 0) return;
  const SinkhornArgs<scalar_t, acc_t> args{p.scores,
                                           p.batch,
                                           p.samples,
                                           p.classes,
                                           p.batch_stride,
                                           p.row_stride,
                                           chunks_per_problem,
                                           p.num_iters,
                                           static_cast<acc_t>(1.0 / p.epsilon),
                                           static_cast<acc_t>(std::log(static_cast<double>(p.samples))),
                                           log_prior,
                                           workspace.take<acc_t>(p.batch * chunks_per_problem * p.classes),
                                           workspace.take<acc_t>(p.batch * chunks_per_problem * p.classes),
                                           workspace.take<acc_t>(p.batch * p.classes),
                                           workspace.take<acc_t>(p.batch * p.classes),
                                           p.flags,
                                           p.assignment};
  launch_sinkhorn_phases(args, options, stream);
}

}  // namespace sinkhorn_kernels
}  // namespace cpsl_ops
