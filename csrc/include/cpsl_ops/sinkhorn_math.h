// Arithmetic of the balanced Sinkhorn-Knopp iteration, shared by the CPU and CUDA kernels.
//
// The official iteration scales Q = exp(S/ε)ᵀ alternately so that class k sums to r_k and every
// sample sums to 1/N, and returns the rows of N·Qᵀ. Writing Q_ik = exp(S_ik/ε + a_k + b_i) and
// eliminating the sample potentials b_i, the output after the last column step is the row softmax
// P_ik(a) = softmax_k(S_ik/ε + a_k) and one full iteration becomes, in the log domain,
//   first:  a_k = log r_k - logsumexp_i(S_ik/ε)
//   then:   a_k += log(N r_k) - log(sum_i P_ik(a))
// The first step normalizes each class, so a constant added to class k's scores changes nothing:
// every backend works with x = (S - M_k)/ε, M_k the largest score of class k, subtracted in score
// units so that this holds in floating point too, however large the constant (and so that x keeps
// the precision of the scores near each class's top, where its mass is). Every exponential is
// taken after subtracting a running maximum, so ε down to 0.01 and fp16/bf16 scores stay finite.
// The CPU kernel's later iterations rescale a kept matrix instead of taking exponentials again
// (rescaled_row_floor): the first softmax for widely spread scores, otherwise exp(x - row maximum),
// one exponential per score, from which it also takes the column log-sum-exps. The CUDA kernel
// keeps nothing: every pass recomputes the row softmax from the scores.
#pragma once
#include <cmath>
#include <limits>

#include "cpsl_ops/macros.h"

namespace cpsl_ops {

// What the kernels raise when an x is not finite: a NaN or infinite score does it, and so does a
// class whose scores spread so widely that (S - max)/ε overflows.
constexpr const char* kNonFiniteScoresMessage =
    "scores have NaN or infinite values, or one class's scores spread so widely that (scores - their maximum) / "
    "epsilon overflows";

// A running log-sum-exp of scale · v over values v: value = scale · max + log(sum) with
// sum = Σ exp((v - max) · scale). With v the scores themselves and scale = 1/ε, max is the class's
// largest score and log(sum) the log-sum-exp of x = (S - max)/ε, each difference taken in score
// units (sinkhorn_math.h's header says why).
template <typename acc_t>
struct OnlineLogSumExp {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = acc_t(0);

  // Branch-free, one exponential: exp(-|v - max| · scale) is the new value's term when it is not a
  // new maximum, else the old sum's rescaling (max - v is -(v - max) exactly in floating point).
  CPSL_HOST_DEVICE void add(acc_t v, acc_t scale = acc_t(1)) {
    const acc_t difference = v - max;
    const bool new_max = difference > acc_t(0);
    const acc_t term = std::exp(-std::fabs(difference) * scale);
    sum = new_max ? sum * term + acc_t(1) : sum + term;
    max = new_max ? v : max;
  }

  CPSL_HOST_DEVICE void merge(const OnlineLogSumExp& other, acc_t scale = acc_t(1)) {
    if (other.sum == acc_t(0)) return;
    if (other.max > max) {
      sum = sum * std::exp((max - other.max) * scale) + other.sum;
      max = other.max;
    } else {
      sum += other.sum * std::exp((other.max - max) * scale);
    }
  }

  CPSL_HOST_DEVICE acc_t value() const { return max + std::log(sum); }
};

// Class potential after the first iteration, from the column log-sum-exp of S/ε.
template <typename acc_t>
CPSL_HOST_DEVICE acc_t initial_class_potential(acc_t log_prior, acc_t column_logsumexp) {
  return log_prior - column_logsumexp;
}

// Increment of the class potential over one more iteration: a_k += log(N r_k) - log(mass_k). The
// column mass of a row softmax is bounded below by r_k/N in exact arithmetic; the floor only keeps
// a rounding underflow from turning into inf.
template <typename acc_t>
CPSL_HOST_DEVICE acc_t class_potential_step(acc_t log_prior, acc_t log_num_samples, acc_t column_mass) {
  const acc_t floor = std::numeric_limits<acc_t>::min();
  return log_prior + log_num_samples - std::log(column_mass > floor ? column_mass : floor);
}

// Since softmax(x + a + Δ) is softmax(x + a) rescaled by e^Δ_k per class and renormalized per row,
// iterations after the first can update the stored assignment without recomputing any exponential.
// A row whose rescaled sum falls below this floor (every class it likes was scaled down by more than
// ~1e19 in fp32) is recomputed from the scores instead, so no precision is lost to underflow.
template <typename acc_t>
CPSL_HOST_DEVICE acc_t rescaled_row_floor() {
  return std::sqrt(std::numeric_limits<acc_t>::min());
}

}  // namespace cpsl_ops
