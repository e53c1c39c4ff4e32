// Arithmetic of the prototype EMA update, shared by the CPU and CUDA kernels.
#pragma once
#include <cstdint>

#include "cpsl_ops/macros.h"

namespace cpsl_ops {

// Class sums are accumulated in double whatever the feature dtype: the mean of 2^27 fp32 pixels
// then keeps the precision of fp32 (summed in fp32 it is off in the second digit).
using class_sum_t = double;

// m·p + (1 − m)·(sum / count) for a class with pixels; an absent class keeps its prototype.
template <typename acc_t>
CPSL_HOST_DEVICE acc_t ema_class_mean(acc_t previous, class_sum_t sum, int64_t count, acc_t momentum) {
  if (count == 0) return previous;
  const acc_t mean = static_cast<acc_t>(sum / static_cast<class_sum_t>(count));
  return momentum * previous + (acc_t(1) - momentum) * mean;
}

}  // namespace cpsl_ops
