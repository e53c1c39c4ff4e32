// Host-side preparation of the Sinkhorn class prior, shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

namespace cpsl_ops {

// log of the prior normalized per problem, in the accumulation dtype; raises on a non-positive or
// non-finite entry (one host synchronization on a GPU: the prior has only B × K values).
inline at::Tensor normalized_log_prior(const at::Tensor& class_prior, at::ScalarType acc_type) {
  const at::Tensor prior = class_prior.to(acc_type);
  TORCH_CHECK_VALUE(at::isfinite(prior).all().item<bool>() && (prior > 0).all().item<bool>(),
                    "balanced_sinkhorn: class_prior must be positive and finite in every class");
  return (prior / prior.sum(-1, true)).log().contiguous();
}

}  // namespace cpsl_ops
