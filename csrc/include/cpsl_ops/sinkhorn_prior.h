// The Sinkhorn class prior, normalized per problem: shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>
#include <cstdint>

#include "cpsl_ops/macros.h"

namespace cpsl_ops {

// log_prior[k] = log(r_k / Σ_j r_j) of one problem's prior, computed in double as
// log r_k - log max r - log Σ_j (r_j / max r): no sum overflows and no logarithm is of a quotient
// that underflowed, whatever the prior's dtype; then cast to the accumulation type. False if an
// entry is not positive and finite (the caller raises).
template <typename prior_t, typename acc_t>
CPSL_HOST_DEVICE bool normalized_log_prior(const prior_t* prior, int64_t stride, int64_t classes, acc_t* log_prior) {
  double largest = 0;
  bool valid = true;
  for (int64_t k = 0; k < classes; ++k) {
    const double value = static_cast<double>(prior[k * stride]);
    valid = valid && value > 0 && value - value == 0;
    largest = value > largest ? value : largest;
  }
  if (!valid) return false;
  double total = 0;
  for (int64_t k = 0; k < classes; ++k) total += static_cast<double>(prior[k * stride]) / largest;
  const double log_scale = std::log(largest) + std::log(total);
  for (int64_t k = 0; k < classes; ++k)
    log_prior[k] = static_cast<acc_t>(std::log(static_cast<double>(prior[k * stride])) - log_scale);
  return true;
}

}  // namespace cpsl_ops
