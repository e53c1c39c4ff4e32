// Arithmetic of the prototype similarity, shared by the CPU and CUDA kernels.
//
// Normalization follows torch.nn.functional.normalize: x / max(||x||, kNormEps). Its derivative is
// (I - x̂ x̂ᵀ) / ||x|| above the clamp and I / kNormEps below it, so the projection term is switched
// off where the clamp is active.
#pragma once
#include <cmath>

#include "cpsl_ops/macros.h"

namespace cpsl_ops {

constexpr double kNormEps = 1e-12;

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

// One coordinate of the gradient with respect to x, given the gradient u with respect to
// normalize(x): inv_norm * u_d - switch * inv_norm^2 * <u, x̂> * x_d, where <u, x̂> is passed in as
// grad_dot_normalized (for features it is sum_k g_k cos_k, for a prototype <G_k, ĉ_k>).
template <typename acc_t>
CPSL_HOST_DEVICE acc_t normalized_input_grad(
    acc_t grad_normalized, acc_t grad_dot_normalized, acc_t x, acc_t inv_norm, acc_t switch_on) {
  return inv_norm * grad_normalized - switch_on * inv_norm * inv_norm * grad_dot_normalized * x;
}

}  // namespace cpsl_ops
