// CUDA kernel of cpsl_ops::balanced_sinkhorn (schema: ops/sinkhorn.cpp; math: sinkhorn_math.h).
//
// One warp per row: lane l holds classes l, l + 32, ... (kClassesPerLane of them), so a row's
// softmax is two warp reductions. Each block owns a fixed range of rows and writes per-class
// partial results that a small kernel merges in block order: deterministic, no atomics. All B
// problems run in the same launches (grid.y). Passes: column log-sum-exp, T − 1 column-mass passes
// and the final softmax write, each followed by a tiny merge of K values per problem.
#include <torch/library.h>

#include <limits>

#include "cpsl_ops/cuda_utils.cuh"
#include "cpsl_ops/macros.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/sinkhorn_math.h"
#include "cpsl_ops/sinkhorn_prior.h"

namespace cpsl_ops {
namespace {

constexpr int kRowsPerBlock = 1024;
constexpr int kWarps = cuda::kThreads / cuda::kWarp;

struct Problem {
  int64_t samples, classes, batch_stride, row_stride;
};

template <typename scalar_t, typename acc_t, int kClassesPerLane>
__global__ void column_logsumexp_kernel(const scalar_t* __restrict__ scores, Problem problem, acc_t inv_epsilon,
                                        acc_t* __restrict__ partial_max, acc_t* __restrict__ partial_sum,
                                        int32_t* __restrict__ non_finite) {
  __shared__ acc_t shared_max[kWarps][kClassesPerLane * cuda::kWarp];
  __shared__ acc_t shared_sum[kWarps][kClassesPerLane * cuda::kWarp];
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp;
  const int64_t b = blockIdx.y, first = blockIdx.x * static_cast<int64_t>(kRowsPerBlock);
  const int64_t last = min(problem.samples, first + kRowsPerBlock);
  const scalar_t* s = scores + b * problem.batch_stride;
  OnlineLogSumExp<acc_t> lse[kClassesPerLane];
  bool finite = true;
  for (int64_t i = first + warp; i < last; i += kWarps)
#pragma unroll
    for (int c = 0; c < kClassesPerLane; ++c) {
      const int64_t k = lane + c * cuda::kWarp;
      if (k < problem.classes) {
        const acc_t x = static_cast<acc_t>(s[i * problem.row_stride + k]) * inv_epsilon;
        finite &= isfinite(x);
        lse[c].add(x);
      }
    }
  if (!finite) *non_finite = 1;
#pragma unroll
  for (int c = 0; c < kClassesPerLane; ++c) {
    shared_max[warp][lane + c * cuda::kWarp] = lse[c].max;
    shared_sum[warp][lane + c * cuda::kWarp] = lse[c].sum;
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < problem.classes; k += blockDim.x) {
    OnlineLogSumExp<acc_t> merged;
    for (int w = 0; w < kWarps; ++w) merged.merge(OnlineLogSumExp<acc_t>{shared_max[w][k], shared_sum[w][k]});
    const int64_t index = (b * gridDim.x + blockIdx.x) * problem.classes + k;
    partial_max[index] = merged.max;
    partial_sum[index] = merged.sum;
  }
}

template <typename acc_t>
__global__ void initial_potential_kernel(const acc_t* __restrict__ partial_max, const acc_t* __restrict__ partial_sum,
                                         const acc_t* __restrict__ log_prior, acc_t* __restrict__ potential,
                                         int64_t blocks, int64_t classes) {
  const int64_t b = blockIdx.x;
  for (int64_t k = threadIdx.x; k < classes; k += blockDim.x) {
    OnlineLogSumExp<acc_t> merged;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t index = (b * blocks + blk) * classes + k;
      merged.merge(OnlineLogSumExp<acc_t>{partial_max[index], partial_sum[index]});
    }
    potential[b * classes + k] = initial_class_potential(log_prior[b * classes + k], merged.value());
  }
}

// The warp's row softmax of S/ε + potential for its lane's classes.
template <typename scalar_t, typename acc_t, int kClassesPerLane>
__device__ __forceinline__ void warp_row_softmax(const scalar_t* row, const acc_t* potential, int64_t classes,
                                                 acc_t inv_epsilon, int lane, acc_t* values) {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
#pragma unroll
  for (int c = 0; c < kClassesPerLane; ++c) {
    const int64_t k = lane + c * cuda::kWarp;
    values[c] = k < classes ? static_cast<acc_t>(row[k]) * inv_epsilon + potential[k]
                            : -std::numeric_limits<acc_t>::infinity();
    max = values[c] > max ? values[c] : max;
  }
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

template <typename scalar_t, typename acc_t, int kClassesPerLane>
__global__ void column_mass_kernel(const scalar_t* __restrict__ scores, Problem problem, acc_t inv_epsilon,
                                   const acc_t* __restrict__ potential, acc_t* __restrict__ partial_mass) {
  __shared__ acc_t shared_mass[kWarps][kClassesPerLane * cuda::kWarp];
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp;
  const int64_t b = blockIdx.y, first = blockIdx.x * static_cast<int64_t>(kRowsPerBlock);
  const int64_t last = min(problem.samples, first + kRowsPerBlock);
  const scalar_t* s = scores + b * problem.batch_stride;
  acc_t mass[kClassesPerLane] = {}, values[kClassesPerLane];
  for (int64_t i = first + warp; i < last; i += kWarps) {
    warp_row_softmax<scalar_t, acc_t, kClassesPerLane>(s + i * problem.row_stride, potential + b * problem.classes,
                                                        problem.classes, inv_epsilon, lane, values);
#pragma unroll
    for (int c = 0; c < kClassesPerLane; ++c) mass[c] += values[c];
  }
#pragma unroll
  for (int c = 0; c < kClassesPerLane; ++c) shared_mass[warp][lane + c * cuda::kWarp] = mass[c];
  __syncthreads();
  for (int64_t k = threadIdx.x; k < problem.classes; k += blockDim.x) {
    acc_t total = 0;
    for (int w = 0; w < kWarps; ++w) total += shared_mass[w][k];
    partial_mass[(b * gridDim.x + blockIdx.x) * problem.classes + k] = total;
  }
}

template <typename acc_t>
__global__ void potential_step_kernel(const acc_t* __restrict__ partial_mass, const acc_t* __restrict__ log_prior,
                                      acc_t* __restrict__ potential, int64_t blocks, int64_t classes,
                                      acc_t log_num_samples) {
  const int64_t b = blockIdx.x;
  for (int64_t k = threadIdx.x; k < classes; k += blockDim.x) {
    acc_t mass = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) mass += partial_mass[(b * blocks + blk) * classes + k];
    potential[b * classes + k] += class_potential_step(log_prior[b * classes + k], log_num_samples, mass);
  }
}

template <typename scalar_t, typename acc_t, int kClassesPerLane>
__global__ void assignment_kernel(const scalar_t* __restrict__ scores, Problem problem, acc_t inv_epsilon,
                                  const acc_t* __restrict__ potential, scalar_t* __restrict__ out) {
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp;
  const int64_t b = blockIdx.y, first = blockIdx.x * static_cast<int64_t>(kRowsPerBlock);
  const int64_t last = min(problem.samples, first + kRowsPerBlock);
  const scalar_t* s = scores + b * problem.batch_stride;
  scalar_t* o = out + b * problem.samples * problem.classes;
  acc_t values[kClassesPerLane];
  for (int64_t i = first + warp; i < last; i += kWarps) {
    warp_row_softmax<scalar_t, acc_t, kClassesPerLane>(s + i * problem.row_stride, potential + b * problem.classes,
                                                        problem.classes, inv_epsilon, lane, values);
#pragma unroll
    for (int c = 0; c < kClassesPerLane; ++c) {
      const int64_t k = lane + c * cuda::kWarp;
      if (k < problem.classes) o[i * problem.classes + k] = static_cast<scalar_t>(values[c]);
    }
  }
}

template <typename scalar_t, int kClassesPerLane>
void run_sinkhorn(const at::Tensor& scores, const at::Tensor& log_prior, double epsilon, int64_t num_iters,
                  at::Tensor& assignment) {
  using acc_t = at::opmath_type<scalar_t>;
  const Problem problem{scores.size(1), scores.size(2), scores.stride(0), scores.stride(1)};
  const int64_t batch = scores.size(0), blocks = cuda::blocks_for(problem.samples, kRowsPerBlock);
  const acc_t inv_epsilon = static_cast<acc_t>(1.0 / epsilon);
  const auto options = scores.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor partial_a = at::empty({batch, blocks, problem.classes}, options);
  at::Tensor partial_b = at::empty({batch, blocks, problem.classes}, options);
  at::Tensor potential = at::empty({batch, problem.classes}, options);
  at::Tensor non_finite = at::zeros({1}, scores.options().dtype(at::kInt));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(blocks, batch);
  const scalar_t* s = scores.data_ptr<scalar_t>();

  column_logsumexp_kernel<scalar_t, acc_t, kClassesPerLane><<<grid, cuda::kThreads, 0, stream>>>(
      s, problem, inv_epsilon, partial_a.data_ptr<acc_t>(), partial_b.data_ptr<acc_t>(), non_finite.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK_VALUE(!cuda::flag_raised(non_finite), "balanced_sinkhorn: scores / epsilon has NaN or infinite values");
  initial_potential_kernel<acc_t><<<batch, cuda::kThreads, 0, stream>>>(
      partial_a.data_ptr<acc_t>(), partial_b.data_ptr<acc_t>(), log_prior.data_ptr<acc_t>(),
      potential.data_ptr<acc_t>(), blocks, problem.classes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const acc_t log_num_samples = static_cast<acc_t>(std::log(static_cast<double>(problem.samples)));
  for (int64_t iter = 1; iter < num_iters; ++iter) {
    column_mass_kernel<scalar_t, acc_t, kClassesPerLane><<<grid, cuda::kThreads, 0, stream>>>(
        s, problem, inv_epsilon, potential.data_ptr<acc_t>(), partial_a.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    potential_step_kernel<acc_t><<<batch, cuda::kThreads, 0, stream>>>(
        partial_a.data_ptr<acc_t>(), log_prior.data_ptr<acc_t>(), potential.data_ptr<acc_t>(), blocks,
        problem.classes, log_num_samples);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  assignment_kernel<scalar_t, acc_t, kClassesPerLane><<<grid, cuda::kThreads, 0, stream>>>(
      s, problem, inv_epsilon, potential.data_ptr<acc_t>(), assignment.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor balanced_sinkhorn_cuda(const at::Tensor& scores, const at::Tensor& class_prior, double epsilon,
                                  int64_t num_iters) {
  check_sinkhorn_inputs(scores, class_prior, epsilon, num_iters);
  TORCH_CHECK(scores.size(2) <= 8 * cuda::kWarp, "balanced_sinkhorn: the CUDA kernel supports K <= 256, got ",
              scores.size(2));
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor rows = scores.stride(2) == 1 ? scores : scores.contiguous();
  at::Tensor assignment = at::empty(scores.sizes(), scores.options().memory_format(at::MemoryFormat::Contiguous));
  if (assignment.numel() == 0) return assignment;
  CPSL_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "balanced_sinkhorn_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor log_prior = normalized_log_prior(class_prior, c10::CppTypeToScalarType<acc_t>::value);
    const int64_t classes = scores.size(2);
    if (classes <= cuda::kWarp) {
      run_sinkhorn<scalar_t, 1>(rows, log_prior, epsilon, num_iters, assignment);
    } else if (classes <= 2 * cuda::kWarp) {
      run_sinkhorn<scalar_t, 2>(rows, log_prior, epsilon, num_iters, assignment);
    } else if (classes <= 4 * cuda::kWarp) {
      run_sinkhorn<scalar_t, 4>(rows, log_prior, epsilon, num_iters, assignment);
    } else {
      run_sinkhorn<scalar_t, 8>(rows, log_prior, epsilon, num_iters, assignment);
    }
  });
  return assignment;
}

}  // namespace

TORCH_LIBRARY_IMPL(cpsl_ops, CUDA, m) { m.impl("balanced_sinkhorn", &balanced_sinkhorn_cuda); }

}  // namespace cpsl_ops
