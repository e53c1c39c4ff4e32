// The pieces of the CUDA similarity kernels that both generations use (kernel_generation.h):
// the call's inputs, the normalization of the prototypes and its backward (the cosine metric's).
// Kernels and launches: similarity_kernels.cuh (current) and previous/similarity_kernels.cuh.
#pragma once
#include <cstdint>

#include "cpsl_ops/cuda_launch.cuh"
#include "cpsl_ops/similarity_math.h"

namespace cpsl_ops {
namespace similarity_kernels {

// Normalized prototypes (K, D), their derivative scales and projection switches (K), in the
// accumulation type: one block per prototype. A prototype whose squared norm overflows is
// rescaled (similarity_math.h), by every thread over the whole row: a rare path.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(cuda::kThreads)
    normalize_prototypes_kernel(const scalar_t* __restrict__ prototypes, int64_t stride0, int64_t stride1,
                                int64_t channels, acc_t* __restrict__ values, acc_t* __restrict__ derivative_scale,
                                acc_t* __restrict__ switch_on) {
  __shared__ acc_t scratch[cuda::kThreads / cuda::kWarp];
  const int64_t k = blockIdx.x;
  const scalar_t* row = prototypes + k * stride0;
  const auto value = [&](int64_t d) { return static_cast<acc_t>(row[d * stride1]); };
  acc_t squared = 0, scale = 1;
  for (int64_t d = threadIdx.x; d < channels; d += blockDim.x) squared += value(d) * value(d);
  squared = cuda::block_sum(squared, scratch);  // the same in every thread
  if (norm_overflows(squared)) {
    scale = row_overflow_scale<acc_t>(value, channels);
    squared = scaled_squared_norm(value, channels, scale);
  }
  const acc_t inverse = inverse_clamped_norm(squared);
  for (int64_t d = threadIdx.x; d < channels; d += blockDim.x) values[k * channels + d] = value(d) * scale * inverse;
  if (threadIdx.x == 0) {
    derivative_scale[k] = scale * inverse;
    switch_on[k] = projection_switch(squared);
  }
}

// grad_c[k, d] from grad_hat through the normalization of prototype k: one block per prototype.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(cuda::kThreads)
    prototype_normalization_grad_kernel(const acc_t* __restrict__ grad_hat, const acc_t* __restrict__ values,
                                        const acc_t* __restrict__ derivative_scale,
                                        const acc_t* __restrict__ switch_on, int64_t channels,
                                        scalar_t* __restrict__ grad) {
  __shared__ acc_t scratch[cuda::kThreads / cuda::kWarp];
  const int64_t k = blockIdx.x;
  acc_t dot = 0;
  for (int64_t d = threadIdx.x; d < channels; d += blockDim.x) dot += grad_hat[k * channels + d] * values[k * channels + d];
  dot = cuda::block_sum(dot, scratch);
  for (int64_t d = threadIdx.x; d < channels; d += blockDim.x)
    grad[k * channels + d] = static_cast<scalar_t>(normalized_input_grad(
        grad_hat[k * channels + d], dot, values[k * channels + d], derivative_scale[k], switch_on[k]));
}

// The inputs of one forward or backward call: features as a (B, D, P) view, prototypes (K, D).
template <typename scalar_t>
struct SimilarityInputs {
  const scalar_t* features;
  cuda::Strides3d feature_strides;
  int64_t batch, channels, pixels;
  const scalar_t* prototypes;
  int64_t prototype_stride0, prototype_stride1, classes;
  double temperature;
  SimilarityMetric metric;
};

// The normalized prototypes of one call, in the accumulation type, in working memory.
template <typename acc_t>
struct NormalizedPrototypes {
  acc_t *values, *derivative_scale, *switch_on;  // (K, D), (K), (K)
};

template <typename scalar_t, typename acc_t>
NormalizedPrototypes<acc_t> normalize_prototypes(const SimilarityInputs<scalar_t>& in, cuda::Workspace& workspace,
                                                 cudaStream_t stream) {
  const NormalizedPrototypes<acc_t> out{workspace.take<acc_t>(in.classes * in.channels),
                                        workspace.take<acc_t>(in.classes), workspace.take<acc_t>(in.classes)};
  if (in.classes == 0) return out;
  normalize_prototypes_kernel<scalar_t, acc_t><<<in.classes, cuda::kThreads, 0, stream>>>(
      in.prototypes, in.prototype_stride0, in.prototype_stride1, in.channels, out.values, out.derivative_scale,
      out.switch_on);
  CPSL_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace similarity_kernels
}  // namespace cpsl_ops
