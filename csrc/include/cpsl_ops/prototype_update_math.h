// Arithmetic of the prototype EMA update, shared by the CPU and CUDA kernels.
#pragma once
#include <cstdint>

#include "cpsl_ops/macros.h"

namespace cpsl_ops {

// m·p + (1 − m)·(sum / count) for a class with pixels; an absent class keeps its prototype.
template <typename acc_t>
CPSL_HOST_DEVICE acc_t ema_class_mean(acc_t previous, acc_t sum, int64_t count, acc_t momentum) {
  return count > 0 ? momentum * previous + (acc_t(1) - momentum) * (sum / static_cast<acc_t>(count)) : previous;
}

}  // namespace cpsl_ops
