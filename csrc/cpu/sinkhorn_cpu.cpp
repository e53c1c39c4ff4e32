// CPU kernel of cpsl_ops::balanced_sinkhorn (schema: ops/sinkhorn.cpp; math: sinkhorn_math.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "cpsl_ops/layout.h"
#include "cpsl_ops/sinkhorn_math.h"

namespace cpsl_ops {
namespace {

// Writes softmax_k(row_k / ε + potential_k) into out[0..K).
template <typename scalar_t, typename acc_t>
void row_softmax(const scalar_t* row, const acc_t* potential, acc_t inv_epsilon, int64_t classes, acc_t* out) {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = 0; k < classes; ++k) {
    out[k] = static_cast<acc_t>(row[k]) * inv_epsilon + potential[k];
    max = std::max(max, out[k]);
  }
  acc_t sum = 0;
  for (int64_t k = 0; k < classes; ++k) {
    out[k] = std::exp(out[k] - max);
    sum += out[k];
  }
  for (int64_t k = 0; k < classes; ++k) out[k] /= sum;
}

template <typename scalar_t>
void sinkhorn_kernel(const at::Tensor& scores, const at::Tensor& log_prior, double epsilon, int64_t num_iters,
                     at::Tensor& assignment) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = scores.size(0), samples = scores.size(1), classes = scores.size(2);
  const int64_t block = deterministic_block_size(samples, 1024, 256);
  const int64_t num_blocks = (samples + block - 1) / block;
  const acc_t inv_epsilon = acc_t(1) / static_cast<acc_t>(epsilon);
  const acc_t log_num_samples = std::log(static_cast<acc_t>(samples));
  const acc_t* log_r_all = log_prior.data_ptr<acc_t>();

  std::vector<OnlineLogSumExp<acc_t>> column_lse(num_blocks * classes);
  std::vector<acc_t> column_mass(num_blocks * classes), potential(classes);
  for (int64_t b = 0; b < batch; ++b) {
    const scalar_t* s = scores.data_ptr<scalar_t>() + b * scores.stride(0);
    const int64_t row_stride = scores.stride(1);
    scalar_t* out = assignment.data_ptr<scalar_t>() + b * samples * classes;
    const acc_t* log_r = log_r_all + b * classes;
    auto block_rows = [&](int64_t blk) { return std::make_pair(blk * block, std::min(samples, (blk + 1) * block)); };

    std::atomic<bool> non_finite{false};
    std::fill(column_lse.begin(), column_lse.end(), OnlineLogSumExp<acc_t>());
    at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        OnlineLogSumExp<acc_t>* lse = column_lse.data() + blk * classes;
        const auto [first, last] = block_rows(blk);
        for (int64_t i = first; i < last; ++i)
          for (int64_t k = 0; k < classes; ++k) {
            const acc_t x = static_cast<acc_t>(s[i * row_stride + k]) * inv_epsilon;
            if (!std::isfinite(x)) non_finite = true;
            lse[k].add(x);
          }
      }
    });
    TORCH_CHECK_VALUE(!non_finite, "balanced_sinkhorn: scores / epsilon has NaN or infinite values (problem ", b,
                      " of ", batch, ")");
    for (int64_t k = 0; k < classes; ++k) {
      for (int64_t blk = 1; blk < num_blocks; ++blk) column_lse[k].merge(column_lse[blk * classes + k]);
      potential[k] = initial_class_potential(log_r[k], column_lse[k].value());
    }

    for (int64_t iter = 1; iter < num_iters; ++iter) {
      std::fill(column_mass.begin(), column_mass.end(), acc_t(0));
      at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> row(classes);
        for (int64_t blk = begin; blk < end; ++blk) {
          acc_t* mass = column_mass.data() + blk * classes;
          const auto [first, last] = block_rows(blk);
          for (int64_t i = first; i < last; ++i) {
            row_softmax(s + i * row_stride, potential.data(), inv_epsilon, classes, row.data());
            for (int64_t k = 0; k < classes; ++k) mass[k] += row[k];
          }
        }
      });
      for (int64_t k = 0; k < classes; ++k) {
        for (int64_t blk = 1; blk < num_blocks; ++blk) column_mass[k] += column_mass[blk * classes + k];
        potential[k] = next_class_potential(potential[k], log_r[k], log_num_samples, column_mass[k]);
      }
    }

    at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(classes);
      for (int64_t blk = begin; blk < end; ++blk) {
        const auto [first, last] = block_rows(blk);
        for (int64_t i = first; i < last; ++i) {
          row_softmax(s + i * row_stride, potential.data(), inv_epsilon, classes, row.data());
          for (int64_t k = 0; k < classes; ++k) out[i * classes + k] = static_cast<scalar_t>(row[k]);
        }
      }
    });
  }
}

// log of the prior normalized per problem, in the accumulation dtype; raises on a non-positive entry.
at::Tensor normalized_log_prior(const at::Tensor& class_prior, at::ScalarType acc_type) {
  const at::Tensor prior = class_prior.to(acc_type);
  TORCH_CHECK_VALUE(at::isfinite(prior).all().item<bool>() && (prior > 0).all().item<bool>(),
                    "balanced_sinkhorn: class_prior must be positive and finite in every class");
  return (prior / prior.sum(-1, true)).log().contiguous();
}

at::Tensor balanced_sinkhorn_cpu(const at::Tensor& scores, const at::Tensor& class_prior, double epsilon,
                                 int64_t num_iters) {
  TORCH_CHECK(scores.dim() == 3, "balanced_sinkhorn: scores must be (B, N, K), got ", scores.dim(), " dims");
  TORCH_CHECK(class_prior.dim() == 2 && class_prior.size(0) == scores.size(0) && class_prior.size(1) == scores.size(2),
              "balanced_sinkhorn: class_prior must be (B, K) = (", scores.size(0), ", ", scores.size(2), "), got ",
              class_prior.sizes());
  TORCH_CHECK(epsilon > 0, "balanced_sinkhorn: epsilon must be positive, got ", epsilon);
  TORCH_CHECK(num_iters >= 1, "balanced_sinkhorn: num_iters must be at least 1, got ", num_iters);
  TORCH_CHECK(at::isFloatingType(class_prior.scalar_type()), "balanced_sinkhorn: class_prior must be floating point");
  const at::Tensor rows = scores.stride(2) == 1 ? scores : scores.contiguous();
  at::Tensor assignment = at::empty(scores.sizes(), scores.options().memory_format(at::MemoryFormat::Contiguous));
  if (assignment.numel() == 0) return assignment;
  CPSL_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "balanced_sinkhorn_cpu", [&] {
    const at::Tensor log_prior = normalized_log_prior(class_prior, c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value);
    sinkhorn_kernel<scalar_t>(rows, log_prior, epsilon, num_iters, assignment);
  });
  return assignment;
}

}  // namespace

TORCH_LIBRARY_IMPL(cpsl_ops, CPU, m) { m.impl("balanced_sinkhorn", &balanced_sinkhorn_cpu); }

}  // namespace cpsl_ops
