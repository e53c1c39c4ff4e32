// The previous generation of the CUDA similarity kernels (kernel_generation.h): CPSL_OPS_CUDA_KERNELS=previous,
// and any K above the current kernels' register bound (similarity_kernels.cuh), for the cosine
// metric only (the euclidean has one generation, the current). Schema and math:
// ops/similarity.cpp, similarity_math.h; shared pieces: similarity_common.cuh.
//
// Forward: one thread per pixel streams its D channels once (coalesced along pixels in the
// channel-first layout), accumulating its squared norm and up to kClassChunk dot products in
// registers; larger K takes ceil(K / kClassChunk) passes. Backward: the same per-pixel pass gives
// each pixel's inverse norm and Σ_k g_k cos_k; the feature gradient contracts over classes per
// element, the prototype gradient over pixels with one block per (channel, chunk of classes) that
// merges its threads in a fixed order. No cuBLAS and no atomics: results are deterministic and do
// not depend on TF32 or cuBLAS settings. Prototypes are normalized by a kernel of their own
// (similarity_common.cuh).
#pragma once
#include <cstdint>

#include "cpsl_ops/cuda_launch.cuh"
#include "cpsl_ops/similarity_math.h"
#include "../similarity_common.cuh"

namespace cpsl_ops {
namespace similarity_kernels {
namespace previous {

constexpr int kClassChunk = 32;

// For each pixel of chunk [k0, k0 + kClassChunk): cosines[k] = <f̂, ĉ_k>; also the squared norm of
// the pixel's features times scale, the power of two that keeps it finite (similarity_math.h: 1
// but where it overflows, where a second pass finds it and a third repeats the first with it).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void pixel_cosines(const scalar_t* features, cuda::Strides3d f, int64_t b, int64_t p,
                                              int64_t channels, const acc_t* prototypes_hat, int64_t classes,
                                              int64_t k0, acc_t* cosines, acc_t& squared, acc_t& scale) {
  const int64_t chunk = min(static_cast<int64_t>(kClassChunk), classes - k0);
  const auto value = [&](int64_t d) { return static_cast<acc_t>(features[f(b, d, p)]); };
  const auto accumulate = [&](acc_t row_scale) {
    squared = 0;
#pragma unroll
    for (int i = 0; i < kClassChunk; ++i) cosines[i] = 0;
    for (int64_t d = 0; d < channels; ++d) {
      const acc_t scaled = value(d) * row_scale;
      squared += scaled * scaled;
#pragma unroll
      for (int i = 0; i < kClassChunk; ++i)
        if (i < chunk) cosines[i] += scaled * prototypes_hat[(k0 + i) * channels + d];
    }
  };
  scale = 1;
  accumulate(acc_t(1));
  if (norm_overflows(squared)) {
    scale = row_overflow_scale<acc_t>(value, channels);
    accumulate(scale);
  }
  const acc_t inv_norm = inverse_clamped_norm(squared);
#pragma unroll
  for (int i = 0; i < kClassChunk; ++i) cosines[i] *= inv_norm;
}

template <typename scalar_t, typename acc_t>
__global__ void similarity_forward_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f,
                                          const acc_t* __restrict__ prototypes_hat, scalar_t* __restrict__ logits,
                                          cuda::Strides3d out, int64_t batch, int64_t channels, int64_t pixels,
                                          int64_t classes, acc_t inv_temperature) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= batch * pixels) return;  // (b, p) flattened: no limit of 65,535 on the batch
  const int64_t b = index / pixels, p = index % pixels;
  acc_t cosines[kClassChunk], squared, scale;
  for (int64_t k0 = 0; k0 < classes; k0 += kClassChunk) {
    pixel_cosines(features, f, b, p, channels, prototypes_hat, classes, k0, cosines, squared, scale);
#pragma unroll
    for (int i = 0; i < kClassChunk; ++i)
      if (k0 + i < classes) logits[out(b, k0 + i, p)] = static_cast<scalar_t>(cosines[i] * inv_temperature);
  }
}

// The per-pixel terms of the backward, (B·P) each: the scale and inverse norm of the rescaled
// features (f̂ = f · scale · inv_norm), the projection switch, and Σ_k g_k cos_k with g = grad_logits / τ.
template <typename acc_t>
struct PixelTerms {
  acc_t *scale, *inv_norm, *switch_on, *grad_dot_cos;
};

template <typename scalar_t, typename acc_t>
__global__ void similarity_pixel_terms_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f,
                                              const scalar_t* __restrict__ grad_logits, cuda::Strides3d g,
                                              const acc_t* __restrict__ prototypes_hat, PixelTerms<acc_t> terms,
                                              int64_t batch, int64_t channels, int64_t pixels, int64_t classes,
                                              acc_t inv_temperature) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= batch * pixels) return;  // (b, p) flattened: no limit of 65,535 on the batch
  const int64_t b = index / pixels, p = index % pixels;
  acc_t cosines[kClassChunk], squared = 0, scale = 1, total = 0;
  for (int64_t k0 = 0; k0 < classes; k0 += kClassChunk) {
    pixel_cosines(features, f, b, p, channels, prototypes_hat, classes, k0, cosines, squared, scale);
#pragma unroll
    for (int i = 0; i < kClassChunk; ++i)
      if (k0 + i < classes) total += static_cast<acc_t>(grad_logits[g(b, k0 + i, p)]) * inv_temperature * cosines[i];
  }
  terms.scale[index] = scale;
  terms.inv_norm[index] = inverse_clamped_norm(squared);
  terms.switch_on[index] = projection_switch(squared);
  terms.grad_dot_cos[index] = total;
}

// grad_f[b, d, p] = normalized_input_grad(Σ_k ĉ[k, d] g[b, k, p] / τ, Σ g cos, f̂, scale · inv_norm,
// switch), one thread per element, pixels fastest.
template <typename scalar_t, typename acc_t>
__global__ void similarity_feature_grad_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f,
                                               const scalar_t* __restrict__ grad_logits, cuda::Strides3d g,
                                               const acc_t* __restrict__ prototypes_hat, PixelTerms<acc_t> terms,
                                               scalar_t* __restrict__ grad, cuda::Strides3d out, int64_t channels,
                                               int64_t pixels, int64_t classes, int64_t total, acc_t inv_temperature) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= total) return;
  const int64_t p = index % pixels, d = (index / pixels) % channels, b = index / (pixels * channels);
  acc_t grad_hat = 0;
  for (int64_t k = 0; k < classes; ++k)
    grad_hat += prototypes_hat[k * channels + d] * static_cast<acc_t>(grad_logits[g(b, k, p)]);
  const int64_t pixel = b * pixels + p;
  const acc_t scale = terms.scale[pixel], inv_norm = terms.inv_norm[pixel];
  grad[out(b, d, p)] = static_cast<scalar_t>(normalized_input_grad(
      grad_hat * inv_temperature, terms.grad_dot_cos[pixel], static_cast<acc_t>(features[f(b, d, p)]) * scale * inv_norm,
      scale * inv_norm, terms.switch_on[pixel]));
}

// grad_hat[k, d] = Σ_{b, p} g[b, k, p] / τ · f̂[b, d, p]: the gradient with respect to the
// normalized prototypes, for channel d = blockIdx.x and the classes of chunk blockIdx.y.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(cuda::kThreads)
    prototype_grad_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f,
                          const scalar_t* __restrict__ grad_logits, cuda::Strides3d g,
                          const acc_t* __restrict__ scale, const acc_t* __restrict__ inv_norm, int64_t batch,
                          int64_t channels, int64_t pixels,
                          int64_t classes, acc_t inv_temperature, acc_t* __restrict__ grad_hat) {
  __shared__ acc_t scratch[cuda::kThreads / cuda::kWarp];
  const int64_t d = blockIdx.x, k0 = static_cast<int64_t>(blockIdx.y) * kClassChunk;
  const int64_t chunk = min(static_cast<int64_t>(kClassChunk), classes - k0);
  acc_t sum[kClassChunk] = {};
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t p = threadIdx.x; p < pixels; p += blockDim.x) {
      const acc_t normalized = static_cast<acc_t>(features[f(b, d, p)]) * scale[b * pixels + p] * inv_norm[b * pixels + p];
#pragma unroll
      for (int c = 0; c < kClassChunk; ++c)
        if (c < chunk) sum[c] += static_cast<acc_t>(grad_logits[g(b, k0 + c, p)]) * normalized;
    }
  for (int c = 0; c < kClassChunk; ++c) {
    const acc_t total = cuda::block_sum(sum[c], scratch);
    if (threadIdx.x == 0 && c < chunk) grad_hat[(k0 + c) * channels + d] = total * inv_temperature;
  }
}

// logits: a (B, K, P) view.
template <typename scalar_t>
void launch_similarity_forward(const SimilarityInputs<scalar_t>& in, scalar_t* logits, cuda::Strides3d logit_strides,
                               cuda::Workspace& workspace, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  if (in.batch * in.pixels * in.classes == 0) return;
  const NormalizedPrototypes<acc_t> normalized = normalize_prototypes<scalar_t, acc_t>(in, workspace, stream);
  similarity_forward_kernel<scalar_t, acc_t><<<cuda::blocks_for(in.batch * in.pixels), cuda::kThreads, 0, stream>>>(
      in.features, in.feature_strides, normalized.values, logits, logit_strides, in.batch, in.channels, in.pixels,
      in.classes, static_cast<acc_t>(1.0 / in.temperature));
  CPSL_KERNEL_LAUNCH_CHECK();
}

// grad_logits and grad_features: (B, K, P) and (B, D, P) views; grad_prototypes contiguous (K, D),
// written only where there are features and classes (the caller zero-fills it).
template <typename scalar_t>
void launch_similarity_backward(const SimilarityInputs<scalar_t>& in, const scalar_t* grad_logits,
                                cuda::Strides3d grad_strides, scalar_t* grad_features,
                                cuda::Strides3d grad_feature_strides, scalar_t* grad_prototypes,
                                cuda::Workspace& workspace, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = in.batch, channels = in.channels, pixels = in.pixels, classes = in.classes;
  if (batch * channels * pixels == 0) return;
  CPSL_CHECK(cuda::blocks_for(classes, kClassChunk) <= cuda::kMaxGridY, "similarity_backward: the CUDA kernel takes at most ",
             cuda::kMaxGridY * kClassChunk, " classes, got ", classes);
  const NormalizedPrototypes<acc_t> normalized = normalize_prototypes<scalar_t, acc_t>(in, workspace, stream);
  const PixelTerms<acc_t> terms{workspace.take<acc_t>(batch * pixels), workspace.take<acc_t>(batch * pixels),
                                workspace.take<acc_t>(batch * pixels), workspace.take<acc_t>(batch * pixels)};
  const acc_t inv_temperature = static_cast<acc_t>(1.0 / in.temperature);
  similarity_pixel_terms_kernel<scalar_t, acc_t><<<cuda::blocks_for(batch * pixels), cuda::kThreads, 0, stream>>>(
      in.features, in.feature_strides, grad_logits, grad_strides, normalized.values, terms, batch, channels, pixels,
      classes, inv_temperature);
  CPSL_KERNEL_LAUNCH_CHECK();
  const int64_t total = batch * channels * pixels;
  similarity_feature_grad_kernel<scalar_t, acc_t><<<cuda::blocks_for(total), cuda::kThreads, 0, stream>>>(
      in.features, in.feature_strides, grad_logits, grad_strides, normalized.values, terms, grad_features,
      grad_feature_strides, channels, pixels, classes, total, inv_temperature);
  CPSL_KERNEL_LAUNCH_CHECK();
  if (classes == 0) return;
  acc_t* grad_hat = workspace.take<acc_t>(classes * channels);
  prototype_grad_kernel<scalar_t, acc_t>
      <<<dim3(channels, cuda::blocks_for(classes, kClassChunk)), cuda::kThreads, 0, stream>>>(
          in.features, in.feature_strides, grad_logits, grad_strides, terms.scale, terms.inv_norm, batch, channels,
          pixels, classes, inv_temperature, grad_hat);
  CPSL_KERNEL_LAUNCH_CHECK();
  prototype_normalization_grad_kernel<scalar_t, acc_t><<<classes, cuda::kThreads, 0, stream>>>(
      grad_hat, normalized.values, normalized.derivative_scale, normalized.switch_on, channels, grad_prototypes);
  CPSL_KERNEL_LAUNCH_CHECK();
}

}  // namespace previous
}  // namespace similarity_kernels
}  // namespace cpsl_ops
