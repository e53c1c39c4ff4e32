// CUDA kernel of cpsl_ops::balanced_sinkhorn (schema: ops/sinkhorn.cpp; math: sinkhorn_math.h).
//
// One cooperative launch runs every iteration of all B problems: a grid of co-resident blocks
// walks fixed chunks of kRowsPerChunk rows, and grid-wide barriers separate the passes (column
// log-sum-exp, T − 1 column masses, the final softmax) from the merges of their per-chunk partials
// into the class potentials. Scores are re-read on every pass; at CPSL's size (8 × 65,792 × 19,
// 40 MB in fp32) they fit in the L2 of an H100 (50 MB). Inside a chunk, one warp takes a row at a time with lane l holding classes
// l, l + 32, ..., so a row's softmax is two warp reductions. Each chunk's partials are merged in
// chunk order by one thread per (problem, class): the result does not depend on the grid size, and
// there are no atomics, so runs are bit-identical.
#include <cooperative_groups.h>
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpsl_ops/cuda_utils.cuh"
#include "cpsl_ops/macros.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/sinkhorn_math.h"
#include "cpsl_ops/sinkhorn_prior.h"
#include "cpsl_ops/stable.h"

namespace cpsl_ops {
namespace {

constexpr int kRowsPerChunk = 1024;
constexpr int kWarps = cuda::kThreads / cuda::kWarp;
// Device-side flags of one call, read by the host once, after every kernel.
constexpr int kNonFiniteScores = 0, kBadPrior = 1, kNumFlags = 2;

// Everything the kernel reads or writes. Buffers written inside the launch are plain pointers (no
// const __restrict__): other blocks write them before a barrier, so reads must not go through the
// read-only cache.
template <typename scalar_t, typename acc_t>
struct SinkhornArgs {
  const scalar_t* __restrict__ scores;
  int64_t batch, samples, classes, batch_stride, row_stride, chunks_per_problem, num_iters;
  acc_t inv_epsilon, log_num_samples;
  const acc_t* __restrict__ log_prior;  // (B, K)
  acc_t* partial_max;                   // (B, chunks, K): per-chunk largest scores, then unused
  acc_t* partial_sum;                   // (B, chunks, K): per-chunk sums of exp((S - max)/ε), then masses
  acc_t* class_max;                     // (B, K): M, each class's largest score
  acc_t* potential;                     // (B, K)
  int32_t* flags;                       // kNumFlags
  scalar_t* __restrict__ out;
};

struct ChunkRows {
  int64_t problem, first, last;
};

template <typename Args>
__device__ __forceinline__ ChunkRows chunk_rows(const Args& a, int64_t chunk) {
  const int64_t first = (chunk % a.chunks_per_problem) * kRowsPerChunk;
  return {chunk / a.chunks_per_problem, first, min(a.samples, first + kRowsPerChunk)};
}

// The warp's row softmax of x + potential for its lane's classes, x = (S - M)/ε with M each
// class's largest score, subtracted in score units (sinkhorn_math.h). An x that is not finite (a
// class spread so widely that it overflows) raises the flag.
template <int kClassesPerLane, typename scalar_t, typename acc_t>
__device__ __forceinline__ void warp_row_softmax(const scalar_t* row, const acc_t* class_max, const acc_t* potential,
                                                 int64_t classes, acc_t inv_epsilon, int lane, acc_t* values,
                                                 int32_t* flags) {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  bool finite = true;
#pragma unroll
  for (int c = 0; c < kClassesPerLane; ++c) {
    const int64_t k = lane + c * cuda::kWarp;
    const acc_t x = k < classes ? (static_cast<acc_t>(row[k]) - class_max[k]) * inv_epsilon : acc_t(0);
    finite &= isfinite(x);
    values[c] = k < classes ? x + potential[k] : -std::numeric_limits<acc_t>::infinity();
    max = values[c] > max ? values[c] : max;
  }
  if (!finite) flags[kNonFiniteScores] = 1;
  max = cuda::warp_max(max);
  acc_t sum = 0;
#pragma unroll
  for (int c = 0; c < kClassesPerLane; ++c) {
    values[c] = exp(values[c] - max);
    sum += values[c];
  }
  sum = cuda::warp_sum(sum);
#pragma unroll
  for (int c = 0; c < kClassesPerLane; ++c) values[c] /= sum;
}

// Per-class running log-sum-exp over the chunk's rows, in score units (its max is the chunk's
// largest score, its sum that of exp((S - max)/ε)), merged over warps in warp order.
template <int kClassesPerLane, typename scalar_t, typename acc_t>
__device__ void chunk_column_logsumexp(const SinkhornArgs<scalar_t, acc_t>& a, int64_t chunk,
                                       acc_t (*shared_max)[kClassesPerLane * cuda::kWarp],
                                       acc_t (*shared_sum)[kClassesPerLane * cuda::kWarp]) {
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp;
  const ChunkRows rows = chunk_rows(a, chunk);
  const scalar_t* s = a.scores + rows.problem * a.batch_stride;
  OnlineLogSumExp<acc_t> lse[kClassesPerLane];
  bool finite = true;
  for (int64_t i = rows.first + warp; i < rows.last; i += kWarps)
#pragma unroll
    for (int c = 0; c < kClassesPerLane; ++c) {
      const int64_t k = lane + c * cuda::kWarp;
      if (k < a.classes) {
        const acc_t score = static_cast<acc_t>(s[i * a.row_stride + k]);
        finite &= isfinite(score);
        lse[c].add(score, a.inv_epsilon);
      }
    }
  if (!finite) a.flags[kNonFiniteScores] = 1;
#pragma unroll
  for (int c = 0; c < kClassesPerLane; ++c) {
    shared_max[warp][lane + c * cuda::kWarp] = lse[c].max;
    shared_sum[warp][lane + c * cuda::kWarp] = lse[c].sum;
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < a.classes; k += blockDim.x) {
    OnlineLogSumExp<acc_t> merged;
    for (int w = 0; w < kWarps; ++w)
      merged.merge(OnlineLogSumExp<acc_t>{shared_max[w][k], shared_sum[w][k]}, a.inv_epsilon);
    a.partial_max[chunk * a.classes + k] = merged.max;
    a.partial_sum[chunk * a.classes + k] = merged.sum;
  }
  __syncthreads();  // the block's next chunk rewrites the shared arrays
}

// Per-class sums of the current row softmax over the chunk's rows, summed over warps in warp order.
template <int kClassesPerLane, typename scalar_t, typename acc_t>
__device__ void chunk_column_mass(const SinkhornArgs<scalar_t, acc_t>& a, int64_t chunk,
                                  acc_t (*shared_mass)[kClassesPerLane * cuda::kWarp]) {
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp;
  const ChunkRows rows = chunk_rows(a, chunk);
  const scalar_t* s = a.scores + rows.problem * a.batch_stride;
  acc_t mass[kClassesPerLane] = {}, values[kClassesPerLane];
  for (int64_t i = rows.first + warp; i < rows.last; i += kWarps) {
    warp_row_softmax<kClassesPerLane>(s + i * a.row_stride, a.class_max + rows.problem * a.classes,
                                      a.potential + rows.problem * a.classes, a.classes, a.inv_epsilon, lane, values,
                                      a.flags);
#pragma unroll
    for (int c = 0; c < kClassesPerLane; ++c) mass[c] += values[c];
  }
#pragma unroll
  for (int c = 0; c < kClassesPerLane; ++c) shared_mass[warp][lane + c * cuda::kWarp] = mass[c];
  __syncthreads();
  for (int64_t k = threadIdx.x; k < a.classes; k += blockDim.x) {
    acc_t total = 0;
    for (int w = 0; w < kWarps; ++w) total += shared_mass[w][k];
    a.partial_sum[chunk * a.classes + k] = total;
  }
  __syncthreads();
}

template <int kClassesPerLane, typename scalar_t, typename acc_t>
__device__ void chunk_assignment(const SinkhornArgs<scalar_t, acc_t>& a, int64_t chunk) {
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp;
  const ChunkRows rows = chunk_rows(a, chunk);
  const scalar_t* s = a.scores + rows.problem * a.batch_stride;
  scalar_t* o = a.out + rows.problem * a.samples * a.classes;
  acc_t values[kClassesPerLane];
  for (int64_t i = rows.first + warp; i < rows.last; i += kWarps) {
    warp_row_softmax<kClassesPerLane>(s + i * a.row_stride, a.class_max + rows.problem * a.classes,
                                      a.potential + rows.problem * a.classes, a.classes, a.inv_epsilon, lane, values,
                                      a.flags);
#pragma unroll
    for (int c = 0; c < kClassesPerLane; ++c) {
      const int64_t k = lane + c * cuda::kWarp;
      if (k < a.classes) o[i * a.classes + k] = static_cast<scalar_t>(values[c]);
    }
  }
}

template <int kClassesPerLane, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(cuda::kThreads) sinkhorn_kernel(SinkhornArgs<scalar_t, acc_t> a) {
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  __shared__ acc_t shared_a[kWarps][kClassesPerLane * cuda::kWarp];
  __shared__ acc_t shared_b[kWarps][kClassesPerLane * cuda::kWarp];
  const int64_t chunks = a.batch * a.chunks_per_problem, pairs = a.batch * a.classes;
  const int64_t thread = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (a.flags[kBadPrior]) return;  // written by log_prior_kernel before this launch; the host raises

  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x)
    chunk_column_logsumexp<kClassesPerLane>(a, chunk, shared_a, shared_b);
  grid.sync();
  if (a.flags[kNonFiniteScores]) return;  // every block reads the same flag after the barrier; the host raises
  for (int64_t pair = thread; pair < pairs; pair += threads) {
    const int64_t b = pair / a.classes, k = pair % a.classes;
    OnlineLogSumExp<acc_t> merged;
    for (int64_t c = b * a.chunks_per_problem; c < (b + 1) * a.chunks_per_problem; ++c)
      merged.merge(OnlineLogSumExp<acc_t>{a.partial_max[c * a.classes + k], a.partial_sum[c * a.classes + k]},
                   a.inv_epsilon);
    a.class_max[pair] = merged.max;  // the log-sum-exp of x = (S - M)/ε is log(merged.sum)
    a.potential[pair] = initial_class_potential(a.log_prior[pair], std::log(merged.sum));
  }
  grid.sync();

  for (int64_t iter = 1; iter < a.num_iters; ++iter) {
    for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x)
      chunk_column_mass<kClassesPerLane>(a, chunk, shared_a);
    grid.sync();
    for (int64_t pair = thread; pair < pairs; pair += threads) {
      const int64_t b = pair / a.classes, k = pair % a.classes;
      acc_t mass = 0;
      for (int64_t c = b * a.chunks_per_problem; c < (b + 1) * a.chunks_per_problem; ++c)
        mass += a.partial_sum[c * a.classes + k];
      a.potential[pair] += class_potential_step(a.log_prior[pair], a.log_num_samples, mass);
    }
    grid.sync();
  }

  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) chunk_assignment<kClassesPerLane>(a, chunk);
}

// log of each problem's normalized prior; raises kBadPrior on a non-positive or non-finite entry.
template <typename prior_t, typename acc_t>
__global__ void log_prior_kernel(const prior_t* __restrict__ prior, int64_t stride0, int64_t stride1, int64_t batch,
                                 int64_t classes, acc_t* __restrict__ log_prior, int32_t* __restrict__ flags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  if (!normalized_log_prior(prior + b * stride0, stride1, classes, log_prior + b * classes)) flags[kBadPrior] = 1;
}

template <typename scalar_t, int kClassesPerLane>
void run_sinkhorn(const cuda::DeviceContext& context, const Tensor& scores, const Tensor& log_prior,
                  const Tensor& flags, double epsilon, int64_t num_iters, const Tensor& assignment) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = scores.size(0), samples = scores.size(1), classes = scores.size(2);
  const int64_t chunks_per_problem = cuda::blocks_for(samples, kRowsPerChunk);
  const ScalarType acc_dtype = scalar_type_of<acc_t>();
  const Tensor partial_max = empty_on(scores, {batch, chunks_per_problem, classes}, acc_dtype);
  const Tensor partial_sum = empty_on(scores, {batch, chunks_per_problem, classes}, acc_dtype);
  const Tensor class_max = empty_on(scores, {batch, classes}, acc_dtype);
  const Tensor potential = empty_on(scores, {batch, classes}, acc_dtype);
  SinkhornArgs<scalar_t, acc_t> args{data_of<const scalar_t>(scores),
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
                                     data_of<int32_t>(flags),
                                     data_of<scalar_t>(assignment)};

  // A cooperative launch needs every block resident at once: no more blocks than the device holds.
  const auto kernel = sinkhorn_kernel<kClassesPerLane, scalar_t, acc_t>;
  int blocks_per_multiprocessor = 0;
  CPSL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_multiprocessor, kernel, cuda::kThreads, 0));
  const int64_t resident =
      static_cast<int64_t>(blocks_per_multiprocessor) * context.attribute(cudaDevAttrMultiProcessorCount);
  CPSL_CHECK(resident > 0, "balanced_sinkhorn: the CUDA kernel does not fit on this device");
  const unsigned int grid = static_cast<unsigned int>(std::min(batch * chunks_per_problem, resident));
  void* kernel_args[] = {&args};
  CPSL_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(grid), dim3(cuda::kThreads),
                                              kernel_args, 0, context.stream()));
}

Tensor balanced_sinkhorn_cuda(const Tensor& scores, const Tensor& class_prior, double epsilon, int64_t num_iters) {
  check_sinkhorn_inputs(scores, class_prior, epsilon, num_iters);
  const int64_t batch = scores.size(0), samples = scores.size(1), classes = scores.size(2);
  CPSL_CHECK(classes <= 8 * cuda::kWarp, "balanced_sinkhorn: the CUDA kernel supports K <= 256, got ", classes);
  const cuda::DeviceContext context(scores);
  const Tensor rows = scores.stride(2) == 1 ? scores : torch::stable::contiguous(scores);
  const Tensor assignment = empty_on(scores, {batch, samples, classes}, scores.scalar_type());
  if (batch * classes == 0) return assignment;
  dispatch_floating(scores.scalar_type(), "balanced_sinkhorn", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const Tensor log_prior = empty_on(scores, {batch, classes}, scalar_type_of<acc_t>());
    const Tensor flags = zeros_on(scores, {kNumFlags}, ScalarType::Int);
    dispatch_floating(class_prior.scalar_type(), "balanced_sinkhorn", [&](auto prior_tag) {
      using prior_t = decltype(prior_tag);
      log_prior_kernel<prior_t, acc_t><<<cuda::blocks_for(batch), cuda::kThreads, 0, context.stream()>>>(
          data_of<const prior_t>(class_prior), class_prior.stride(0), class_prior.stride(1), batch, classes,
          data_of<acc_t>(log_prior), data_of<int32_t>(flags));
      CPSL_KERNEL_LAUNCH_CHECK();
    });
    if (samples > 0) {
      CPSL_CHECK(context.attribute(cudaDevAttrCooperativeLaunch),
                 "balanced_sinkhorn: this GPU does not support cooperative launches, which the CUDA kernel needs; "
                 "use cpsl_ops.set_backend('reference') on it");
      if (classes <= cuda::kWarp) {
        run_sinkhorn<scalar_t, 1>(context, rows, log_prior, flags, epsilon, num_iters, assignment);
      } else if (classes <= 2 * cuda::kWarp) {
        run_sinkhorn<scalar_t, 2>(context, rows, log_prior, flags, epsilon, num_iters, assignment);
      } else if (classes <= 4 * cuda::kWarp) {
        run_sinkhorn<scalar_t, 4>(context, rows, log_prior, flags, epsilon, num_iters, assignment);
      } else {
        run_sinkhorn<scalar_t, 8>(context, rows, log_prior, flags, epsilon, num_iters, assignment);
      }
    }
    const cuda::HostFlags<kNumFlags> raised(flags, context.stream());
    CPSL_CHECK_VALUE(!raised[kBadPrior], "balanced_sinkhorn: class_prior must be positive and finite in every class");
    CPSL_CHECK_VALUE(!raised[kNonFiniteScores], "balanced_sinkhorn: ", kNonFiniteScoresMessage);
  });
  return assignment;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(cpsl_ops, CUDA, m) { m.impl("balanced_sinkhorn", TORCH_BOX(&balanced_sinkhorn_cuda)); }

}  // namespace cpsl_ops
