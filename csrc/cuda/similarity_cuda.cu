// CUDA kernels of cpsl_ops::similarity and its backward (schema and math: ops/similarity.cpp).
//
// Forward: one thread per pixel streams its D channels once (coalesced along pixels in the
// channel-first layout), accumulating its squared norm and up to kClassChunk dot products in
// registers; larger K takes ceil(K / kClassChunk) passes. Backward: the same per-pixel pass gives
// each pixel's inverse norm and Σ_k g_k cos_k; the two contractions over classes and pixels are
// cuBLAS GEMMs (deterministic), and one elementwise pass applies the normalization's derivative.
#include <torch/library.h>

#include "cpsl_ops/cuda_utils.cuh"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/macros.h"
#include "cpsl_ops/similarity_math.h"

namespace cpsl_ops {
namespace {

constexpr int kClassChunk = 32;

// Normalized prototypes (K, D), their inverse norms and projection switches, in fp32 (fp64).
struct NormalizedPrototypes {
  at::Tensor values, inv_norm, switch_on;
};

NormalizedPrototypes normalize_prototypes(const at::Tensor& prototypes, at::ScalarType acc_type) {
  const at::Tensor p = prototypes.to(acc_type);
  const at::Tensor norm = p.norm(2, 1, true);
  const at::Tensor clamped = norm.clamp_min(kNormEps);
  return {(p / clamped).contiguous(), clamped.reciprocal().squeeze(1).contiguous(), (norm > kNormEps).to(acc_type).squeeze(1)};
}

// For each pixel of chunk [k0, k0 + kClassChunk): cosines[k] = <f̂, ĉ_k>; also inverse norm.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void pixel_cosines(const scalar_t* features, cuda::Strides3d f, int64_t b, int64_t p,
                                              int64_t channels, const acc_t* prototypes_hat, int64_t classes,
                                              int64_t k0, acc_t* cosines, acc_t& squared) {
  const int64_t chunk = min(static_cast<int64_t>(kClassChunk), classes - k0);
  squared = 0;
#pragma unroll
  for (int i = 0; i < kClassChunk; ++i) cosines[i] = 0;
  for (int64_t d = 0; d < channels; ++d) {
    const acc_t value = static_cast<acc_t>(features[f(b, d, p)]);
    squared += value * value;
#pragma unroll
    for (int i = 0; i < kClassChunk; ++i)
      if (i < chunk) cosines[i] += value * prototypes_hat[(k0 + i) * channels + d];
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
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (p >= pixels) return;
  acc_t cosines[kClassChunk], squared;
  for (int64_t k0 = 0; k0 < classes; k0 += kClassChunk) {
    pixel_cosines(features, f, b, p, channels, prototypes_hat, classes, k0, cosines, squared);
#pragma unroll
    for (int i = 0; i < kClassChunk; ++i)
      if (k0 + i < classes) logits[out(b, k0 + i, p)] = static_cast<scalar_t>(cosines[i] * inv_temperature);
  }
}

// Per pixel: inv_norm, switch, and Σ_k g_k cos_k with g = grad_logits / τ.
template <typename scalar_t, typename acc_t>
__global__ void similarity_pixel_terms_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f,
                                              const scalar_t* __restrict__ grad_logits, cuda::Strides3d g,
                                              const acc_t* __restrict__ prototypes_hat, acc_t* __restrict__ inv_norm,
                                              acc_t* __restrict__ switch_on, acc_t* __restrict__ grad_dot_cos,
                                              int64_t channels, int64_t pixels, int64_t classes, acc_t inv_temperature) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (p >= pixels) return;
  acc_t cosines[kClassChunk], squared = 0, total = 0;
  for (int64_t k0 = 0; k0 < classes; k0 += kClassChunk) {
    pixel_cosines(features, f, b, p, channels, prototypes_hat, classes, k0, cosines, squared);
#pragma unroll
    for (int i = 0; i < kClassChunk; ++i)
      if (k0 + i < classes) total += static_cast<acc_t>(grad_logits[g(b, k0 + i, p)]) * inv_temperature * cosines[i];
  }
  const int64_t index = b * pixels + p;
  inv_norm[index] = inverse_clamped_norm(squared);
  switch_on[index] = projection_switch(squared);
  grad_dot_cos[index] = total;
}

// grad_f[b, d, p] = normalized_input_grad(grad_hat[b, d, p], Σ g cos, f, inv_norm, switch)
template <typename scalar_t, typename acc_t>
__global__ void similarity_feature_grad_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f,
                                               const acc_t* __restrict__ grad_hat, const acc_t* __restrict__ inv_norm,
                                               const acc_t* __restrict__ switch_on,
                                               const acc_t* __restrict__ grad_dot_cos, scalar_t* __restrict__ grad,
                                               int64_t channels, int64_t pixels, int64_t total) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= total) return;
  const int64_t p = index % pixels, d = (index / pixels) % channels, b = index / (pixels * channels);
  const int64_t pixel = b * pixels + p;
  grad[index] = static_cast<scalar_t>(normalized_input_grad(grad_hat[index], grad_dot_cos[pixel],
                                                            static_cast<acc_t>(features[f(b, d, p)]), inv_norm[pixel],
                                                            switch_on[pixel]));
}

at::Tensor similarity_cuda(const at::Tensor& features, const at::Tensor& prototypes, double temperature) {
  check_similarity_inputs(features, prototypes, temperature);
  const c10::cuda::CUDAGuard guard(features.device());
  at::Tensor logits = at::empty(logits_shape(features, prototypes.size(0)), features.options());
  if (logits.numel() == 0) return logits;
  const at::Tensor f = as_batch_channel_pixel(features), out = as_batch_channel_pixel(logits);
  CPSL_DISPATCH_FLOATING_TYPES(features.scalar_type(), "similarity_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto normalized = normalize_prototypes(prototypes, c10::CppTypeToScalarType<acc_t>::value);
    const dim3 grid(cuda::blocks_for(f.size(2)), f.size(0));
    similarity_forward_kernel<scalar_t, acc_t><<<grid, cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        f.data_ptr<scalar_t>(), cuda::Strides3d(f), normalized.values.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
        cuda::Strides3d(out), f.size(0), f.size(1), f.size(2), prototypes.size(0),
        static_cast<acc_t>(1.0 / temperature));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return logits;
}

std::tuple<at::Tensor, at::Tensor> similarity_backward_cuda(const at::Tensor& grad_logits, const at::Tensor& features,
                                                            const at::Tensor& prototypes, double temperature) {
  check_similarity_backward_inputs(grad_logits, features, prototypes, temperature);
  const c10::cuda::CUDAGuard guard(features.device());
  at::Tensor grad_features = at::empty(features.sizes(), features.options());
  at::Tensor grad_prototypes = at::zeros(prototypes.sizes(), prototypes.options());
  if (grad_features.numel() == 0) return {grad_features, grad_prototypes};
  const at::Tensor grad = grad_logits.to(features.scalar_type());
  const at::Tensor f = as_batch_channel_pixel(features), g = as_batch_channel_pixel(grad);
  const int64_t batch = f.size(0), channels = f.size(1), pixels = f.size(2);
  CPSL_DISPATCH_FLOATING_TYPES(features.scalar_type(), "similarity_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const auto normalized = normalize_prototypes(prototypes, acc_type);
    const auto options = features.options().dtype(acc_type);
    at::Tensor inv_norm = at::empty({batch, pixels}, options), switch_on = at::empty({batch, pixels}, options);
    at::Tensor grad_dot_cos = at::empty({batch, pixels}, options);
    const acc_t inv_temperature = static_cast<acc_t>(1.0 / temperature);
    const dim3 grid(cuda::blocks_for(pixels), batch);
    similarity_pixel_terms_kernel<scalar_t, acc_t><<<grid, cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        f.data_ptr<scalar_t>(), cuda::Strides3d(f), g.data_ptr<scalar_t>(), cuda::Strides3d(g),
        normalized.values.data_ptr<acc_t>(), inv_norm.data_ptr<acc_t>(), switch_on.data_ptr<acc_t>(),
        grad_dot_cos.data_ptr<acc_t>(), channels, pixels, prototypes.size(0), inv_temperature);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Contractions over classes and pixels as GEMMs: g_scaled = g/τ (B, K, P).
    const at::Tensor g_scaled = g.to(acc_type) * inv_temperature;
    const at::Tensor grad_hat = at::matmul(normalized.values.t(), g_scaled).contiguous();  // (B, D, P)
    const at::Tensor grad_prototypes_hat =
        at::matmul(g_scaled * inv_norm.unsqueeze(1), f.to(acc_type).transpose(1, 2)).sum(0);  // (K, D)
    at::Tensor grad_features_view = grad_features.dim() == 2 ? at::empty({batch, channels, pixels}, features.options())
                                                             : as_batch_channel_pixel(grad_features);
    similarity_feature_grad_kernel<scalar_t, acc_t>
        <<<cuda::blocks_for(grad_hat.numel()), cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            f.data_ptr<scalar_t>(), cuda::Strides3d(f), grad_hat.data_ptr<acc_t>(), inv_norm.data_ptr<acc_t>(),
            switch_on.data_ptr<acc_t>(), grad_dot_cos.data_ptr<acc_t>(), grad_features_view.data_ptr<scalar_t>(),
            channels, pixels, grad_hat.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (grad_features.dim() == 2) grad_features.copy_(grad_features_view[0].t());
    // d/dc of ĉ = c / max(|c|, eps), applied to the gradient with respect to ĉ.
    const at::Tensor raw = prototypes.to(acc_type);
    const at::Tensor grad_dot_hat = (grad_prototypes_hat * normalized.values).sum(1, true);
    const at::Tensor inv = normalized.inv_norm.unsqueeze(1), on = normalized.switch_on.unsqueeze(1);
    grad_prototypes.copy_(inv * grad_prototypes_hat - on * inv * inv * grad_dot_hat * raw);
  });
  return {grad_features, grad_prototypes};
}

}  // namespace

TORCH_LIBRARY_IMPL(cpsl_ops, CUDA, m) {
  m.impl("similarity", &similarity_cuda);
  m.impl("similarity_backward", &similarity_backward_cuda);
}

}  // namespace cpsl_ops
