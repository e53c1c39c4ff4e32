// The Sinkhorn class prior, normalized per problem: shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>
#include <cstdint>

#include "cpsl_ops/macros.h"

namespace cpsl_ops {

// log_prior[k] = log(r_k / Σ_j r_j) of one problem's prior, in the accumulation type; false if an
// entry is not positive and finite (the caller raises).
template <typename prior_t, typename acc_t>
CPSL_HOST_DEVICE bool normalized_log_prior(const prior_t* prior, int64_t stride, int64_t classes, acc_t* log_prior) {
  acc_t total = 0;
  bool valid = true;
  for (int64_t k = 0; k < classes; ++k) {
    const acc_t value = static_cast<acc_t>(prior[k * stride]);
    valid = valid && value > acc_t(0) && value - value == acc_t(0);
    total += value;
  }
  for (int64_t k = 0; k < classes; ++k) log_prior[k] = std::log(static_cast<acc_t>(prior[k * stride]) / total);
  return valid;
}

}  // namespace cpsl_ops
