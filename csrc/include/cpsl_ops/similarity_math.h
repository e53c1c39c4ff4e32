// Arithmetic of the prototype similarity, shared by the CPU and CUDA kernels.
//
// Two metrics: the cosine, cos(f, c_k) / τ (CPSL), and the euclidean, -||f - c_k|| / τ (ProDA,
// DiGA). Cosine normalization follows torch.nn.functional.normalize: x / max(||x||, kNormEps). Its derivative is
// (I - x̂ x̂ᵀ) / ||x|| above the clamp and I / kNormEps below it, so the projection term is switched
// off where the clamp is active.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "cpsl_ops/check.h"
#include "cpsl_ops/macros.h"

namespace cpsl_ops {

constexpr double kNormEps = 1e-12;

enum class SimilarityMetric { kCosine, kEuclidean };

// The op schema's `str metric` (host code; also the simulator harness's, which links no torch).
inline SimilarityMetric similarity_metric(const std::string& metric) {
  if (metric == "cosine") return SimilarityMetric::kCosine;
  CPSL_CHECK(metric == "euclidean", "similarity: metric must be \"cosine\" or \"euclidean\", got \"", metric, "\"");
  return SimilarityMetric::kEuclidean;
}

// Euclidean metric. The distance is sqrt(Σ_d (f_d - c_d)^2), summed from the differences (not from
// |f|^2 - 2<f, c> + |c|^2, which cancels catastrophically for a pixel near its prototype) and not
// rescaled: like torch.linalg.vector_norm, it is infinite where the sum of squares overflows
// (differences above ~1e19 in fp32). Its gradient with respect to f is (f - c) / d: a unit vector,
// whatever d; at d = 0, where the norm has no derivative, it is 0 (the minimum-norm subgradient,
// as torch.linalg.vector_norm's backward). So the gradients of logits l_k = -d_k / τ with incoming
// gradients g_k are
//   grad_f   = -Σ_k w_k (f - c_k),   grad_c_k = Σ_pixels w_k (f - c_k),   w_k = distance_grad_weight(g_k / τ, d_k),
// each term a difference times its weight, never w_k f - w_k c_k (w_k grows as 1 / d_k).
template <typename acc_t>
CPSL_HOST_DEVICE acc_t distance_grad_weight(acc_t grad_over_temperature, acc_t distance) {
  return distance > acc_t(0) ? grad_over_temperature / distance : acc_t(0);
}

template <typename acc_t>
CPSL_HOST_DEVICE acc_t inverse_clamped_norm(acc_t squared_norm) {
  const acc_t norm = std::sqrt(squared_norm);
  return acc_t(1) / (norm > acc_t(kNormEps) ? norm : acc_t(kNormEps));
}

// 1 where the clamp is inactive (the projection term of the derivative applies), else 0.
template <typename acc_t>
CPSL_HOST_DEVICE acc_t projection_switch(acc_t squared_norm) {
  return std::sqrt(squared_norm) > acc_t(kNormEps) ? acc_t(1) : acc_t(0);
}

// Squared norms overflow for rows above ~1e19 (fp32) or ~1e154 (fp64), though cosines are
// scale-invariant. Such a row, and only such a row (the common path costs one comparison), is
// normalized as x·s instead, with s = overflow_scale(max |x_d|): the power of two that brings its
// largest magnitude into [2, 4), never subnormal, so x·s = x / 2^e exactly and x̂ is unchanged;
// the derivative of x̂ is s times that at x·s, and the clamp never applies (|x·s| >= 2). A NaN
// row (NaN squared norm) is not rescaled, and an infinite entry keeps s = 1: their results are NaN.
template <typename acc_t>
CPSL_HOST_DEVICE bool norm_overflows(acc_t squared_norm) {
  return squared_norm > std::numeric_limits<acc_t>::max();
}

template <typename acc_t>
CPSL_HOST_DEVICE acc_t overflow_scale(acc_t largest_magnitude) {
  if (!(largest_magnitude <= std::numeric_limits<acc_t>::max())) return acc_t(1);
  int exponent;
  std::frexp(largest_magnitude, &exponent);
  return std::ldexp(acc_t(1), 2 - exponent);
}

// Σ_i (value(i)·scale)^2 over i < count, for value(i) a row's entry in the accumulation type.
template <typename acc_t, typename Value>
CPSL_HOST_DEVICE acc_t scaled_squared_norm(const Value& value, int64_t count, acc_t scale) {
  acc_t squared = 0;
  for (int64_t i = 0; i < count; ++i) {
    const acc_t scaled = value(i) * scale;
    squared += scaled * scaled;
  }
  return squared;
}

// overflow_scale of the row value(0), ..., value(count - 1).
template <typename acc_t, typename Value>
CPSL_HOST_DEVICE acc_t row_overflow_scale(const Value& value, int64_t count) {
  acc_t largest = 0;
  for (int64_t i = 0; i < count; ++i) largest = std::fmax(largest, std::fabs(value(i)));
  return overflow_scale(largest);
}

// One coordinate of the gradient with respect to x, given the gradient u with respect to
// x̂ = normalize(x): derivative_scale * (u_d - switch * <u, x̂> * x̂_d), where <u, x̂> is passed in
// as grad_dot_normalized (for features it is sum_k g_k cos_k, for a prototype <G_k, ĉ_k>) and
// derivative_scale is 1 / max(|x|, eps) (s / |x·s| for a rescaled row: it may underflow, as the
// gradient of a huge row is that small).
template <typename acc_t>
CPSL_HOST_DEVICE acc_t normalized_input_grad(
    acc_t grad_normalized, acc_t grad_dot_normalized, acc_t x_hat, acc_t derivative_scale, acc_t switch_on) {
  return derivative_scale * (grad_normalized - switch_on * grad_dot_normalized * x_hat);
}

}  // namespace cpsl_ops
