// Arithmetic of pseudo-label rectification, shared by the CPU and CUDA kernels.
//
// label = argmax_k p_k · softmax(l)_k and confidence = max_k(p_k softmax(l)_k) / sum_k(...). The
// softmax normalizer cancels in both, so each pixel needs only w_k = log p_k + l_k: the label is the
// first argmax of w and the confidence is exp(max w - logsumexp w), which never divides 0 by 0
// when products underflow. w is never formed, though: next to a large logit (1e8 in fp32) log p_k
// would be rounded away, and the label would follow the logits alone. Each class is compared with
// the best one so far through the difference of their logits, exact for close logits, and log p
// keeps its precision.
#pragma once
#include <cmath>
#include <limits>

#include "cpsl_ops/macros.h"

namespace cpsl_ops {

template <typename acc_t>
struct RectifyAccumulator {
  long argmax = -1;      // the best class so far, -1 while no class has mass
  acc_t best_logit = 0;  // its logit and log p: w_best - best_logit = best_log_p
  acc_t best_log_p = 0;
  acc_t sum = acc_t(0);  // sum_k exp(w_k - w_best)

  CPSL_HOST_DEVICE void add(acc_t probability, acc_t logit, long k) {
    const acc_t log_p = std::log(probability);
    if (!(log_p > -std::numeric_limits<acc_t>::infinity())) return;  // no mass
    if (argmax < 0) {
      argmax = k, best_logit = logit, best_log_p = log_p, sum = acc_t(1);
      return;
    }
    const acc_t relative = (logit - best_logit) + log_p;  // w_k - best_logit
    if (relative > best_log_p) {  // strict: ties keep the first class, as torch.argmax does
      sum = sum * std::exp(best_log_p - relative) + acc_t(1);
      argmax = k, best_logit = logit, best_log_p = log_p;
    } else {
      sum += std::exp(relative - best_log_p);
    }
  }

  // A pixel whose soft label has no mass on any class gets confidence 0.
  CPSL_HOST_DEVICE acc_t confidence() const { return argmax < 0 ? acc_t(0) : acc_t(1) / sum; }

  CPSL_HOST_DEVICE long label(acc_t threshold, long ignore_index) const {
    return (argmax < 0 || confidence() < threshold) ? ignore_index : argmax;
  }
};

// The fast form used where it is exact enough: w_k = p_k · e^(l_k − max_j l_j), whose argmax and
// max/sum are the label and confidence. Every factor e^(·) is at most 1, so nothing overflows; a
// pixel whose largest w_k falls below this floor (its soft label sits on classes whose logits are
// ~40 below the best one in fp32) may have lost products to underflow and is redone with
// RectifyAccumulator, exactly.
template <typename acc_t>
CPSL_HOST_DEVICE acc_t rectify_fast_floor() {
  return std::sqrt(std::numeric_limits<acc_t>::min());
}

// False for negative, NaN and infinite soft labels, which have no log.
template <typename acc_t>
CPSL_HOST_DEVICE bool valid_probability(acc_t p) {
  return p >= acc_t(0) && p < std::numeric_limits<acc_t>::infinity();
}

}  // namespace cpsl_ops
