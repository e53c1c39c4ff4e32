// CUDA kernel of cpsl_ops::balanced_sinkhorn (schema: ops/sinkhorn.cpp; math: sinkhorn_math.h;
// passes: sinkhorn_cuda_passes.cuh).
//
// Blocks walk fixed chunks of kRowsPerChunk rows through the passes of the iteration (column
// log-sum-exp, T - 1 column masses, the final softmax); between passes, one thread per (problem,
// class) merges the chunks' partials into the class potential, in chunk order. Scores are re-read
// on every pass; at CPSL's size (8 x 65,792 x 19, 40 MB in fp32) they fit in the L2 of an H100
// (50 MB). There are no atomics, so runs are bit-identical.
//
// Two launch paths give the same bits: one cooperative launch of co-resident blocks with grid-wide
// barriers between passes, or one launch per pass and merge (2T + 1 launches), used wherever the
// cooperative one cannot run: a device without the attribute, a launch refused (MPS or
// green-context SM limits; the error is cleared), or a stream being captured into a CUDA graph.
// Tests select a path and cap the grid with two environment variables, read at each call:
//   CPSL_OPS_CUDA_SINKHORN_LAUNCH      auto (default) | cooperative | per_pass
//   CPSL_OPS_CUDA_SINKHORN_MAX_BLOCKS  a positive cap on the blocks of a pass (each then walks
//                                      several chunks)
#include <cooperative_groups.h>
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "cpsl_ops/cuda_utils.cuh"
#include "cpsl_ops/macros.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/sinkhorn_math.h"
#include "cpsl_ops/sinkhorn_prior.h"
#include "cpsl_ops/stable.h"
#include "sinkhorn_cuda_passes.cuh"

namespace cpsl_ops {
namespace {

using namespace sinkhorn_cuda;

enum class Pass { kColumnLogSumExp, kColumnMass, kAssignment };

// Every chunk of the call, through one pass, in the blocks' grid-stride order.
template <Pass kPass, int kClassesPerLane, typename scalar_t, typename acc_t>
__device__ void run_pass(const SinkhornArgs<scalar_t, acc_t>& a, Scratch<kClassesPerLane, acc_t>& scratch) {
  const int64_t chunks = a.batch * a.chunks_per_problem;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    if constexpr (kPass == Pass::kColumnLogSumExp) {
      column_logsumexp_pass(a, chunk, scratch);
    } else {
      row_softmax_pass<kPass == Pass::kAssignment>(a, chunk, scratch);
    }
  }
}

// Every (problem, class) pair through one merge: the first (after the column log-sum-exp) or a
// later iteration's (after a column mass).
template <bool kFirst, typename scalar_t, typename acc_t>
__device__ void run_merge(const SinkhornArgs<scalar_t, acc_t>& a) {
  const int64_t pairs = a.batch * a.classes;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t pair = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pair < pairs; pair += threads) {
    if constexpr (kFirst) {
      merge_column_logsumexp(a, pair);
    } else {
      merge_column_mass(a, pair);
    }
  }
}

// Whether an earlier kernel of this call raised a flag that stops it (the host then raises, and the
// outputs are not used). Only kernels launched before the reader write these flags: the whole
// grid sees the same values, so no block or warp leaves a barrier the others wait at.
template <typename Args>
__device__ __forceinline__ bool stopped(const Args& a, bool after_first_pass) {
  return a.flags[kBadPrior] || (after_first_pass && a.flags[kNonFiniteScores]);
}

template <int kClassesPerLane, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(cuda::kThreads, 2) cooperative_sinkhorn_kernel(SinkhornArgs<scalar_t, acc_t> a) {
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  __shared__ Scratch<kClassesPerLane, acc_t> scratch;
  if (stopped(a, false)) return;  // every block reads the same flags at the same point: none waits alone
  run_pass<Pass::kColumnLogSumExp>(a, scratch);
  grid.sync();
  if (stopped(a, true)) return;
  run_merge<true>(a);
  grid.sync();
  for (int64_t iter = 1; iter < a.num_iters; ++iter) {
    run_pass<Pass::kColumnMass>(a, scratch);
    grid.sync();
    run_merge<false>(a);
    grid.sync();
  }
  run_pass<Pass::kAssignment>(a, scratch);
}

template <Pass kPass, int kClassesPerLane, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(cuda::kThreads) pass_kernel(SinkhornArgs<scalar_t, acc_t> a) {
  __shared__ Scratch<kClassesPerLane, acc_t> scratch;
  if (stopped(a, kPass != Pass::kColumnLogSumExp)) return;
  run_pass<kPass>(a, scratch);
}

template <bool kFirst, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(cuda::kThreads) merge_kernel(SinkhornArgs<scalar_t, acc_t> a) {
  if (stopped(a, true)) return;
  run_merge<kFirst>(a);
}

// log of each problem's normalized prior; raises kBadPrior on a non-positive or non-finite entry.
template <typename prior_t, typename acc_t>
__global__ void log_prior_kernel(const prior_t* __restrict__ prior, int64_t stride0, int64_t stride1, int64_t batch,
                                 int64_t classes, acc_t* __restrict__ log_prior, int32_t* __restrict__ flags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  if (!normalized_log_prior(prior + b * stride0, stride1, classes, log_prior + b * classes)) flags[kBadPrior] = 1;
}

enum class Launch { kAuto, kCooperative, kPerPass };

Launch launch_setting() {
  const char* value = std::getenv("CPSL_OPS_CUDA_SINKHORN_LAUNCH");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return Launch::kAuto;
  if (std::strcmp(value, "cooperative") == 0) return Launch::kCooperative;
  CPSL_CHECK(std::strcmp(value, "per_pass") == 0,
             "CPSL_OPS_CUDA_SINKHORN_LAUNCH must be auto, cooperative or per_pass, got '", value, "'");
  return Launch::kPerPass;
}

int64_t max_blocks_setting() {
  const char* value = std::getenv("CPSL_OPS_CUDA_SINKHORN_MAX_BLOCKS");
  if (value == nullptr || *value == '\0') return INT_MAX;
  char* end = nullptr;
  const long long blocks = std::strtoll(value, &end, 10);
  CPSL_CHECK(*end == '\0' && blocks > 0, "CPSL_OPS_CUDA_SINKHORN_MAX_BLOCKS must be a positive integer, got '",
             value, "'");
  return std::min<long long>(blocks, INT_MAX);
}

// True if the cooperative kernel was launched. A refusal returns false with the error cleared,
// unless this path was required (then it raises).
template <int kClassesPerLane, typename scalar_t, typename acc_t>
bool launch_cooperative(const cuda::DeviceContext& context, SinkhornArgs<scalar_t, acc_t> args, int64_t max_grid,
                        bool required) {
  const auto kernel = cooperative_sinkhorn_kernel<kClassesPerLane, scalar_t, acc_t>;
  int blocks_per_multiprocessor = 0;
  CPSL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_multiprocessor, kernel, cuda::kThreads, 0));
  const int64_t resident =
      static_cast<int64_t>(blocks_per_multiprocessor) * context.attribute(cudaDevAttrMultiProcessorCount);
  cudaError_t status = cudaErrorCooperativeLaunchTooLarge;
  if (resident > 0) {
    const dim3 grid(static_cast<unsigned int>(std::min(max_grid, resident)));
    void* kernel_args[] = {&args};
    status = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, dim3(cuda::kThreads),
                                         kernel_args, 0, context.stream());
    if (status == cudaSuccess) return true;
    (void)cudaGetLastError();  // a refused launch is also the thread's last error: clear it
  }
  CPSL_CHECK(!required, "balanced_sinkhorn: the cooperative launch was refused (", cudaGetErrorString(status),
             "); CPSL_OPS_CUDA_SINKHORN_LAUNCH=cooperative forbids the per-pass fallback");
  return false;
}

// Loads the per-pass kernels of one instantiation on the current device (CUDA loads kernels
// lazily, at first use), so that the eager warm-up before a CUDA-graph capture loads them, not the
// capture. Once per device and process (loading twice is harmless).
template <int kClassesPerLane, typename scalar_t, typename acc_t>
void load_per_pass_kernels(int device) {
  static std::atomic<uint64_t> loaded_devices{0};
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (loaded_devices.load() & bit)) return;
  const void* kernels[] = {
      reinterpret_cast<const void*>(pass_kernel<Pass::kColumnLogSumExp, kClassesPerLane, scalar_t, acc_t>),
      reinterpret_cast<const void*>(pass_kernel<Pass::kColumnMass, kClassesPerLane, scalar_t, acc_t>),
      reinterpret_cast<const void*>(pass_kernel<Pass::kAssignment, kClassesPerLane, scalar_t, acc_t>),
      reinterpret_cast<const void*>(merge_kernel<true, scalar_t, acc_t>),
      reinterpret_cast<const void*>(merge_kernel<false, scalar_t, acc_t>)};
  for (const void* kernel : kernels) {
    cudaFuncAttributes attributes;
    CPSL_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  }
  loaded_devices.fetch_or(bit);
}

template <int kClassesPerLane, typename scalar_t, typename acc_t>
void launch_per_pass(const cuda::DeviceContext& context, const SinkhornArgs<scalar_t, acc_t>& args,
                     int64_t max_grid) {
  const dim3 grid(static_cast<unsigned int>(max_grid));
  const dim3 merge_grid(static_cast<unsigned int>(cuda::blocks_for(args.batch * args.classes)));
  const cudaStream_t stream = context.stream();
  pass_kernel<Pass::kColumnLogSumExp, kClassesPerLane><<<grid, cuda::kThreads, 0, stream>>>(args);
  CPSL_KERNEL_LAUNCH_CHECK();
  merge_kernel<true><<<merge_grid, cuda::kThreads, 0, stream>>>(args);
  CPSL_KERNEL_LAUNCH_CHECK();
  for (int64_t iter = 1; iter < args.num_iters; ++iter) {
    pass_kernel<Pass::kColumnMass, kClassesPerLane><<<grid, cuda::kThreads, 0, stream>>>(args);
    CPSL_KERNEL_LAUNCH_CHECK();
    merge_kernel<false><<<merge_grid, cuda::kThreads, 0, stream>>>(args);
    CPSL_KERNEL_LAUNCH_CHECK();
  }
  pass_kernel<Pass::kAssignment, kClassesPerLane><<<grid, cuda::kThreads, 0, stream>>>(args);
  CPSL_KERNEL_LAUNCH_CHECK();
}

template <int kClassesPerLane, typename scalar_t>
void run_sinkhorn(const cuda::DeviceContext& context, const Tensor& scores, const Tensor& log_prior,
                  const cuda::DeviceFlags<kNumFlags>& flags, double epsilon, int64_t num_iters,
                  const Tensor& assignment) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = scores.size(0), samples = scores.size(1), classes = scores.size(2);
  const int64_t chunks_per_problem = cuda::blocks_for(samples, kRowsPerChunk);
  const ScalarType acc_dtype = scalar_type_of<acc_t>();
  const Tensor partial_max = empty_on(scores, {batch, chunks_per_problem, classes}, acc_dtype);
  const Tensor partial_sum = empty_on(scores, {batch, chunks_per_problem, classes}, acc_dtype);
  const Tensor class_max = empty_on(scores, {batch, classes}, acc_dtype);
  const Tensor potential = empty_on(scores, {batch, classes}, acc_dtype);
  const SinkhornArgs<scalar_t, acc_t> args{data_of<const scalar_t>(scores),
                                           batch,
                                           samples,
                                           classes,
                                           scores.stride(0),
                                           scores.stride(1),
                                           chunks_per_problem,
                                           num_iters,
                                           static_cast<acc_t>(1.0 / epsilon),
                                           static_cast<acc_t>(std::log(static_cast<double>(samples))),
                                           data_of<const acc_t>(log_prior),
                                           data_of<acc_t>(partial_max),
                                           data_of<acc_t>(partial_sum),
                                           data_of<acc_t>(class_max),
                                           data_of<acc_t>(potential),
                                           flags.data(),
                                           data_of<scalar_t>(assignment)};
  const int64_t max_grid = std::min(batch * chunks_per_problem, max_blocks_setting());
  const Launch launch = launch_setting();
  if (!flags.capturing()) load_per_pass_kernels<kClassesPerLane, scalar_t, acc_t>(context.device());
  // Graph capture takes the per-pass path: it records plain kernel nodes on every CUDA version.
  const bool cooperative = launch == Launch::kCooperative ||
                           (launch == Launch::kAuto && !flags.capturing() &&
                            context.attribute(cudaDevAttrCooperativeLaunch));
  if (cooperative && launch_cooperative<kClassesPerLane>(context, args, max_grid, launch == Launch::kCooperative))
    return;
  launch_per_pass<kClassesPerLane>(context, args, max_grid);
}

Tensor balanced_sinkhorn_cuda(const Tensor& scores, const Tensor& class_prior, double epsilon, int64_t num_iters) {
  check_sinkhorn_inputs(scores, class_prior, epsilon, num_iters);
  const int64_t batch = scores.size(0), samples = scores.size(1), classes = scores.size(2);
  const cuda::DeviceContext context(scores);
  const Tensor rows = scores.stride(2) == 1 ? scores : torch::stable::contiguous(scores);
  const Tensor assignment = empty_on(scores, {batch, samples, classes}, scores.scalar_type());
  if (batch * classes == 0) return assignment;
  const cuda::DeviceFlags<kNumFlags> flags(scores, context.stream());
  dispatch_floating(scores.scalar_type(), "balanced_sinkhorn", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const Tensor log_prior = empty_on(scores, {batch, classes}, scalar_type_of<acc_t>());
    dispatch_floating(class_prior.scalar_type(), "balanced_sinkhorn", [&](auto prior_tag) {
      using prior_t = decltype(prior_tag);
      log_prior_kernel<prior_t, acc_t><<<cuda::blocks_for(batch), cuda::kThreads, 0, context.stream()>>>(
          data_of<const prior_t>(class_prior), class_prior.stride(0), class_prior.stride(1), batch, classes,
          data_of<acc_t>(log_prior), flags.data());
      CPSL_KERNEL_LAUNCH_CHECK();
    });
    if (samples > 0) {
      if (classes <= cuda::kWarp) {
        run_sinkhorn<1, scalar_t>(context, rows, log_prior, flags, epsilon, num_iters, assignment);
      } else if (classes <= 2 * cuda::kWarp) {
        run_sinkhorn<2, scalar_t>(context, rows, log_prior, flags, epsilon, num_iters, assignment);
      } else if (classes <= 4 * cuda::kWarp) {
        run_sinkhorn<4, scalar_t>(context, rows, log_prior, flags, epsilon, num_iters, assignment);
      } else if (classes <= kMaxClassesPerLane * cuda::kWarp) {
        run_sinkhorn<kMaxClassesPerLane, scalar_t>(context, rows, log_prior, flags, epsilon, num_iters, assignment);
      } else {
        run_sinkhorn<kWide, scalar_t>(context, rows, log_prior, flags, epsilon, num_iters, assignment);
      }
    }
    flags.fill_if_raised(assignment, static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN()));
  });
  const auto raised = flags.read();
  CPSL_CHECK_VALUE(!raised[kBadPrior], "balanced_sinkhorn: class_prior must be positive and finite in every class");
  CPSL_CHECK_VALUE(!raised[kNonFiniteScores] && !raised[kSpreadOverflow], "balanced_sinkhorn: ",
                   kNonFiniteScoresMessage);
  return assignment;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(cpsl_ops, CUDA, m) { m.impl("balanced_sinkhorn", TORCH_BOX(&balanced_sinkhorn_cuda)); }

}  // namespace cpsl_ops
