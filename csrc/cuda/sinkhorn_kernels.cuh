// CUDA kernel of cpsl_ops::balanced_sinkhorn and its torch-free launch (math: sinkhorn_math.h; the
// passes over a chunk of rows: sinkhorn_passes.cuh; the op: sinkhorn_cuda.cu).
//
// A call runs 2T + 1 phases in order: the column log-sum-exp pass over every chunk of
// kRowsPerChunk rows, then its merge into each class's maximum and first potential, then for each
// later iteration a column-mass pass and its merge, and last the assignment pass. Passes walk the
// chunks; merges take one thread per (problem, class) pair, folding its chunks' partials in chunk
// order. One kernel body, sinkhorn_kernel, runs a range of phases, and two launch paths use it:
//   cooperative  one launch of co-resident blocks over every phase, a grid-wide barrier between
//                phases;
//   per pass     one launch per phase (2T + 1 launches), wherever the cooperative one cannot run:
//                a device without the attribute, a launch refused (MPS or green-context SM
//                limits; the error is cleared), or a stream being captured into a CUDA graph.
// A chunk's partials do not depend on which block computed them and there are no atomics, so both
// paths and every grid size give the same bits, and what runs under the simulator (per pass,
// tests/gpusim/) is the cooperative path's arithmetic too. Scores are re-read on every pass; at
// CPSL's size (8 x 65,792 x 19, 40 MB in fp32) they fit in the L2 of an H100 (50 MB).
#pragma once
#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpsl_ops/cuda_launch.cuh"
#include "cpsl_ops/sinkhorn_math.h"
#include "cpsl_ops/sinkhorn_prior.h"
#include "sinkhorn_passes.cuh"

namespace cpsl_ops {
namespace sinkhorn_kernels {

// Phase p of a call of T iterations: 0 the column log-sum-exp pass, odd p a merge (p = 1 the
// first), even 0 < p < 2T a column-mass pass, 2T the assignment pass.
__host__ __device__ inline int64_t num_phases(int64_t num_iters) { return 2 * num_iters + 1; }
__host__ __device__ inline bool is_merge(int64_t phase) { return phase % 2 == 1; }

template <int kClassesPerLane, typename scalar_t, typename acc_t>
__device__ void run_phase(const SinkhornArgs<scalar_t, acc_t>& a, int64_t phase,
                          Scratch<kClassesPerLane, acc_t>& scratch) {
  if (is_merge(phase)) {
    const int64_t pairs = a.batch * a.classes, threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t pair = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pair < pairs; pair += threads) {
      if (phase == 1) {
        merge_column_logsumexp(a, pair);
      } else {
        merge_column_mass(a, pair);
      }
    }
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

// Whether an earlier phase or kernel of this call raised a flag that stops it (the host then
// raises, and the outputs are not used). Flags are read only after whatever wrote them finished
// (an earlier kernel, or an earlier phase behind a grid barrier): the whole grid sees the same
// values, so no block leaves a barrier the others wait at.
template <typename Args>
__device__ __forceinline__ bool stopped(const Args& a, int64_t phase) {
  return a.flags[kBadPrior] || (phase > 0 && a.flags[kNonFiniteScores]);
}

// Phases [first_phase, end_phase) of the call, with a grid-wide barrier between two phases when
// kCooperative (then the launch must be cooperative).
template <bool kCooperative, int kClassesPerLane, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(cuda::kThreads, 2)
    sinkhorn_kernel(SinkhornArgs<scalar_t, acc_t> a, int64_t first_phase, int64_t end_phase) {
  __shared__ Scratch<kClassesPerLane, acc_t> scratch;
  for (int64_t phase = first_phase; phase < end_phase; ++phase) {
    if constexpr (kCooperative) {
      if (phase > first_phase) cooperative_groups::this_grid().sync();
    }
    if (stopped(a, phase)) return;
    run_phase<kClassesPerLane>(a, phase, scratch);
  }
}

// log of each problem's normalized prior; raises kBadPrior on a non-positive or non-finite entry.
template <typename prior_t, typename acc_t>
__global__ void log_prior_kernel(const prior_t* __restrict__ prior, int64_t stride0, int64_t stride1, int64_t batch,
                                 int64_t classes, acc_t* __restrict__ log_prior, int32_t* __restrict__ flags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  if (!normalized_log_prior(prior + b * stride0, stride1, classes, log_prior + b * classes)) flags[kBadPrior] = 1;
}

enum class LaunchPath { kAuto, kCooperative, kPerPass };

struct LaunchOptions {
  LaunchPath path = LaunchPath::kAuto;
  int64_t max_blocks = INT_MAX;  // a cap on the blocks of a pass (each then walks several chunks)
  bool capturing = false;        // the stream is being captured into a CUDA graph: per pass
};

// The op's options: tests select a path and cap the grid with two environment variables, read at
// each call:
//   CPSL_OPS_CUDA_SINKHORN_LAUNCH      auto (default) | cooperative | per_pass
//   CPSL_OPS_CUDA_SINKHORN_MAX_BLOCKS  a positive cap on the blocks of a pass
inline LaunchOptions launch_options_from_environment(bool capturing) {
  LaunchOptions options;
  options.capturing = capturing;
  const char* path = std::getenv("CPSL_OPS_CUDA_SINKHORN_LAUNCH");
  if (path != nullptr && *path != '\0' && std::strcmp(path, "auto") != 0) {
    CPSL_CHECK(std::strcmp(path, "cooperative") == 0 || std::strcmp(path, "per_pass") == 0,
               "CPSL_OPS_CUDA_SINKHORN_LAUNCH must be auto, cooperative or per_pass, got '", path, "'");
    options.path = std::strcmp(path, "cooperative") == 0 ? LaunchPath::kCooperative : LaunchPath::kPerPass;
  }
  const char* blocks = std::getenv("CPSL_OPS_CUDA_SINKHORN_MAX_BLOCKS");
  if (blocks != nullptr && *blocks != '\0') {
    char* end = nullptr;
    const long long value = std::strtoll(blocks, &end, 10);
    CPSL_CHECK(*end == '\0' && value > 0, "CPSL_OPS_CUDA_SINKHORN_MAX_BLOCKS must be a positive integer, got '",
               blocks, "'");
    options.max_blocks = std::min<long long>(value, INT_MAX);
  }
  return options;
}

// True if the cooperative kernel was launched. A refusal returns false with the error cleared,
// unless this path was required (then it raises).
template <int kClassesPerLane, typename scalar_t, typename acc_t>
bool launch_cooperative(SinkhornArgs<scalar_t, acc_t> args, int64_t max_grid, bool required, int device,
                        cudaStream_t stream) {
  const auto kernel = sinkhorn_kernel<true, kClassesPerLane, scalar_t, acc_t>;
  int blocks_per_multiprocessor = 0;
  CPSL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_multiprocessor, kernel, cuda::kThreads, 0));
  const int64_t resident = static_cast<int64_t>(blocks_per_multiprocessor) *
                           cuda::device_attribute(device, cudaDevAttrMultiProcessorCount);
  cudaError_t status = cudaErrorCooperativeLaunchTooLarge;
  if (resident > 0) {
    int64_t first_phase = 0, end_phase = num_phases(args.num_iters);
    void* kernel_args[] = {&args, &first_phase, &end_phase};
    status = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                                         dim3(static_cast<unsigned int>(std::min(max_grid, resident))),
                                         dim3(cuda::kThreads), kernel_args, 0, stream);
    if (status == cudaSuccess) return true;
    (void)cudaGetLastError();  // a refused launch is also the thread's last error: clear it
  }
  CPSL_CHECK(!required, "balanced_sinkhorn: the cooperative launch was refused (", cudaGetErrorString(status),
             "); CPSL_OPS_CUDA_SINKHORN_LAUNCH=cooperative forbids the per-pass fallback");
  return false;
}

// Loads the per-pass kernel of one instantiation on the device (CUDA loads kernels lazily, at
// first use), so that the eager warm-up before a CUDA-graph capture loads it, not the capture.
// Once per device and process (loading twice is harmless).
template <int kClassesPerLane, typename scalar_t, typename acc_t>
void load_per_pass_kernel(int device) {
  static std::atomic<uint64_t> loaded_devices{0};
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (loaded_devices.load() & bit)) return;
  cudaFuncAttributes attributes;
  CPSL_CUDA_CHECK(cudaFuncGetAttributes(
      &attributes, reinterpret_cast<const void*>(sinkhorn_kernel<false, kClassesPerLane, scalar_t, acc_t>)));
  loaded_devices.fetch_or(bit);
}

template <int kClassesPerLane, typename scalar_t, typename acc_t>
void launch_per_pass(const SinkhornArgs<scalar_t, acc_t>& args, int64_t max_grid, cudaStream_t stream) {
  const dim3 pass_grid(static_cast<unsigned int>(max_grid));
  const dim3 merge_grid(static_cast<unsigned int>(cuda::blocks_for(args.batch * args.classes)));
  for (int64_t phase = 0; phase < num_phases(args.num_iters); ++phase) {
    sinkhorn_kernel<false, kClassesPerLane>
        <<<is_merge(phase) ? merge_grid : pass_grid, cuda::kThreads, 0, stream>>>(args, phase, phase + 1);
    CPSL_KERNEL_LAUNCH_CHECK();
  }
}

template <int kClassesPerLane, typename scalar_t, typename acc_t>
void launch_phases(const SinkhornArgs<scalar_t, acc_t>& args, const LaunchOptions& options, cudaStream_t stream) {
  const int64_t max_grid = std::min(args.batch * args.chunks_per_problem, options.max_blocks);
  const int device = cuda::current_device();
  if (!options.capturing) load_per_pass_kernel<kClassesPerLane, scalar_t, acc_t>(device);
  // Graph capture takes the per-pass path: it records plain kernel nodes on every CUDA version.
  const bool cooperative =
      options.path == LaunchPath::kCooperative ||
      (options.path == LaunchPath::kAuto && !options.capturing &&
       cuda::device_attribute(device, cudaDevAttrCooperativeLaunch));
  if (cooperative && launch_cooperative<kClassesPerLane>(args, max_grid, options.path == LaunchPath::kCooperative,
                                                         device, stream))
    return;
  launch_per_pass<kClassesPerLane>(args, max_grid, stream);
}

// One call: B problems of scores (B, N, K) with unit class stride; assignment contiguous (B, N, K).
template <typename scalar_t, typename prior_t>
struct SinkhornProblem {
  const scalar_t* scores;
  int64_t batch, samples, classes, batch_stride, row_stride;
  const prior_t* prior;
  int64_t prior_stride0, prior_stride1;
  double epsilon;
  int64_t num_iters;
  scalar_t* assignment;
  int32_t* flags;  // kNumFlags, zero on entry
};

// The phases of every problem, in the register layout that fits K (or the wide one).
template <typename scalar_t, typename acc_t>
void launch_sinkhorn_phases(const SinkhornArgs<scalar_t, acc_t>& args, const LaunchOptions& options,
                            cudaStream_t stream) {
  if (args.classes <= cuda::kWarp) {
    launch_phases<1>(args, options, stream);
  } else if (args.classes <= 2 * cuda::kWarp) {
    launch_phases<2>(args, options, stream);
  } else if (args.classes <= 4 * cuda::kWarp) {
    launch_phases<4>(args, options, stream);
  } else if (args.classes <= kMaxClassesPerLane * cuda::kWarp) {
    launch_phases<kMaxClassesPerLane>(args, options, stream);
  } else {
    launch_phases<kWide>(args, options, stream);
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
