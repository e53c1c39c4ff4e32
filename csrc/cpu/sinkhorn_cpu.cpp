// CPU kernel of cpsl_ops::balanced_sinkhorn (schema: ops/sinkhorn.cpp; math: sinkhorn_math.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "cpsl_ops/cpu_math.h"
#include "cpsl_ops/cpu_memory.h"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/sinkhorn_math.h"
#include "cpsl_ops/sinkhorn_prior.h"

namespace cpsl_ops {
namespace {

// Rows per tile. A tile is held class-major, x[k * kRowTile + r], so that every loop runs over
// contiguous rows and vectorizes, whatever K is.
constexpr int64_t kRowTile = 64;

// Rows [first, first + rows) of a problem as contiguous acc_t values (rows × classes): the scores
// themselves when they already are, else a converted copy in buffer.
template <typename scalar_t, typename acc_t>
const acc_t* contiguous_rows(const scalar_t* scores, int64_t row_stride, int64_t first, int64_t rows, int64_t classes,
                             acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (row_stride == classes) return scores + first * classes;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < classes; ++k)
      buffer[r * classes + k] = static_cast<acc_t>(scores[(first + r) * row_stride + k]);
  return buffer;
}

// Column log-sum-exps of S/ε, read in the rows' own order with no transpose: kLanes rows hold
// `classes` whole registers, and register j of every such group holds the same positions
// p = (row mod kLanes) * classes + k, so each position keeps its own running log-sum-exp with
// whole-register operations only. The positions of a class are merged once per call.
// Folds a tile's rows into position_max/position_sum (kLanes * classes each); false if a value of
// S/ε is not finite.
template <typename acc_t>
bool accumulate_column_logsumexp(const acc_t* rows_data, int64_t rows, int64_t classes, acc_t inv_epsilon,
                                 acc_t* position_max, acc_t* position_sum) {
  using Lanes = LanesOf<acc_t>;
  const int64_t group = kLanes * classes, groups = rows / kLanes;
  // Sums value - value: 0 while every value is finite, NaN after an inf or NaN. Read in row order,
  // which also brings the tile into L1 for the class-strided loops below.
  Lanes not_finite = {};
  for (int64_t i = 0; i < groups * group; i += kLanes) {
    const Lanes value = load_lanes<Lanes>(rows_data + i) * inv_epsilon;
    not_finite += value - value;
  }
  if (groups > 0)
    for (int64_t j = 0; j < classes; ++j) {
      const acc_t* values = rows_data + j * kLanes;
      Lanes tile_max = load_lanes<Lanes>(values);
      for (int64_t g = 1; g < groups; ++g) tile_max = lanes_max(tile_max, load_lanes<Lanes>(values + g * group));
      const Lanes old_max = load_lanes<Lanes>(position_max + j * kLanes);
      const Lanes max = lanes_max(old_max, tile_max * inv_epsilon);
      Lanes sum = load_lanes<Lanes>(position_sum + j * kLanes) * vector_exp(old_max - max);
      for (int64_t g = 0; g < groups; ++g) sum += vector_exp(load_lanes<Lanes>(values + g * group) * inv_epsilon - max);
      store_lanes(position_max + j * kLanes, max);
      store_lanes(position_sum + j * kLanes, sum);
    }
  bool finite = true;
  for (int64_t l = 0; l < kLanes; ++l) finite &= not_finite[l] == acc_t(0);
  for (int64_t r = groups * kLanes; r < rows; ++r)  // the last rows of a problem
    for (int64_t k = 0; k < classes; ++k) {
      const acc_t value = rows_data[r * classes + k] * inv_epsilon;
      finite &= value - value == acc_t(0);
      const int64_t position = (r % kLanes) * classes + k;
      OnlineLogSumExp<acc_t> lse{position_max[position], position_sum[position]};
      lse.add(value);
      position_max[position] = lse.max;
      position_sum[position] = lse.sum;
    }
  return finite;
}

// x[k][r] <- scores[first + r][k] / ε + potential[k] - (its row maximum), exponentiated, for the
// tile's rows; row_inverse[r] = 1 / Σ_k x[k][r], so that x · row_inverse is the row softmax. The
// caller applies row_inverse on its way out of the tile, which saves a pass over it.
template <typename scalar_t, typename acc_t>
void tile_row_exp(const scalar_t* scores, int64_t row_stride, int64_t first, int64_t rows, int64_t classes,
                  acc_t inv_epsilon, const acc_t* potential, acc_t* __restrict x, acc_t* __restrict row_inverse) {
  transpose(scores + first * row_stride, row_stride, rows, classes, x, kRowTile);
  acc_t row_max[kRowTile];
  std::fill(row_max, row_max + rows, -std::numeric_limits<acc_t>::infinity());
  std::fill(row_inverse, row_inverse + rows, acc_t(0));
  for (int64_t k = 0; k < classes; ++k) {
    const acc_t* __restrict column = x + k * kRowTile;
    const acc_t shift = potential[k];
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t value = column[r] * inv_epsilon + shift;
      row_max[r] = value > row_max[r] ? value : row_max[r];
    }
  }
  for (int64_t k = 0; k < classes; ++k) {
    acc_t* __restrict column = x + k * kRowTile;
    const acc_t shift = potential[k];
    for (int64_t r = 0; r < rows; ++r) {
      column[r] = vector_exp(column[r] * inv_epsilon + shift - row_max[r]);
      row_inverse[r] += column[r];
    }
  }
  for (int64_t r = 0; r < rows; ++r) row_inverse[r] = acc_t(1) / row_inverse[r];
}

// x[k * kRowTile] = softmax over k of (row[k] / ε + potential[k]), from the scores, exactly.
template <typename scalar_t, typename acc_t>
void recompute_row(const scalar_t* row, const acc_t* potential, acc_t inv_epsilon, int64_t classes, acc_t* x) {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = 0; k < classes; ++k) max = std::max(max, static_cast<acc_t>(row[k]) * inv_epsilon + potential[k]);
  acc_t sum = 0;
  for (int64_t k = 0; k < classes; ++k) {
    x[k * kRowTile] = std::exp(static_cast<acc_t>(row[k]) * inv_epsilon + potential[k] - max);
    sum += x[k * kRowTile];
  }
  for (int64_t k = 0; k < classes; ++k) x[k * kRowTile] /= sum;
}

template <typename scalar_t>
void sinkhorn_kernel(const at::Tensor& scores, const at::Tensor& log_prior, double epsilon, int64_t num_iters,
                     at::Tensor& assignment) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = scores.size(0), samples = scores.size(1), classes = scores.size(2);
  const int64_t tiles = (samples + kRowTile - 1) / kRowTile;
  const int64_t tiles_per_block = deterministic_block_size(tiles, 8, 256);
  const int64_t num_blocks = (tiles + tiles_per_block - 1) / tiles_per_block;
  const acc_t inv_epsilon = acc_t(1) / static_cast<acc_t>(epsilon);
  const acc_t log_num_samples = std::log(static_cast<acc_t>(samples));
  const acc_t* log_r_all = log_prior.data_ptr<acc_t>();
  const int64_t row_stride = scores.stride(1);

  std::vector<acc_t> lane_max(num_blocks * classes * kLanes), lane_sum(num_blocks * classes * kLanes);
  std::vector<acc_t> column_mass(num_blocks * classes), potential(classes), rescale(classes);
  // The first iteration's assignment P1, tile by tile as the tiles hold it (class-major inside a
  // tile), so that a tile is one contiguous block of K × kRowTile values to stream in.
  // It is kept from call to call of the same thread (one per dtype): a fresh buffer this large
  // would be page-faulted in and zeroed by the OS on every call, which costs as much as a pass.
  static thread_local std::vector<acc_t> cached_workspace;
  const int64_t workspace_size = tiles * classes * kRowTile;
  if (num_iters > 1 && cached_workspace.size() < static_cast<size_t>(workspace_size))
    cached_workspace.resize(workspace_size);
  acc_t* const workspace = cached_workspace.data();
  for (int64_t b = 0; b < batch; ++b) {
    const scalar_t* s = scores.data_ptr<scalar_t>() + b * scores.stride(0);
    scalar_t* out = assignment.data_ptr<scalar_t>() + b * samples * classes;
    const acc_t* log_r = log_r_all + b * classes;

    // Runs visit(tile_buffer, first_row, rows, block) over every tile, in parallel over blocks.
    auto for_each_tile = [&](auto&& visit) {
      at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
        std::vector<acc_t> x(classes * kRowTile);
        for (int64_t blk = block_begin; blk < block_end; ++blk)
          for (int64_t t = blk * tiles_per_block; t < std::min(tiles, (blk + 1) * tiles_per_block); ++t) {
            const int64_t first = t * kRowTile, rows = std::min(kRowTile, samples - first);
            visit(x.data(), first, rows, blk);
          }
      });
    };

    std::atomic<bool> non_finite{false};
    std::fill(lane_max.begin(), lane_max.end(), -std::numeric_limits<acc_t>::infinity());
    std::fill(lane_sum.begin(), lane_sum.end(), acc_t(0));
    for_each_tile([&](acc_t* x, int64_t first, int64_t rows, int64_t blk) {
      const acc_t* rows_data = contiguous_rows(s, row_stride, first, rows, classes, x);
      const int64_t positions = blk * classes * kLanes;
      if (!accumulate_column_logsumexp(rows_data, rows, classes, inv_epsilon, lane_max.data() + positions,
                                       lane_sum.data() + positions))
        non_finite = true;
    });
    TORCH_CHECK_VALUE(!non_finite, "balanced_sinkhorn: scores / epsilon has NaN or infinite values (problem ", b,
                      " of ", batch, ")");
    for (int64_t k = 0; k < classes; ++k) {
      OnlineLogSumExp<acc_t> column_lse;
      for (int64_t blk = 0; blk < num_blocks; ++blk)
        for (int64_t l = 0; l < kLanes; ++l) {
          const int64_t position = blk * classes * kLanes + l * classes + k;
          column_lse.merge(OnlineLogSumExp<acc_t>{lane_max[position], lane_sum[position]});
        }
      potential[k] = initial_class_potential(log_r[k], column_lse.value());
    }

    // out[first + r][k] = x[k][r] · row_inverse[r]
    auto store_tile = [&](const acc_t* x, const acc_t* row_inverse, int64_t first, int64_t rows) {
      transpose(x, kRowTile, classes, rows, out + first * classes, classes, row_inverse);
    };
    if (num_iters == 1) {
      for_each_tile([&](acc_t* x, int64_t first, int64_t rows, int64_t) {
        acc_t row_inverse[kRowTile];
        tile_row_exp(s, row_stride, first, rows, classes, inv_epsilon, potential.data(), x, row_inverse);
        store_tile(x, row_inverse, first, rows);
      });
      continue;
    }

    // Iteration 1 ends with the row softmax P1 of S/ε + a, computed from the scores once and kept
    // in the workspace with its column masses.
    std::fill(column_mass.begin(), column_mass.end(), acc_t(0));
    for_each_tile([&](acc_t* x, int64_t first, int64_t rows, int64_t blk) {
      acc_t row_inverse[kRowTile];
      tile_row_exp(s, row_stride, first, rows, classes, inv_epsilon, potential.data(), x, row_inverse);
      acc_t* mass = column_mass.data() + blk * classes;
      for (int64_t k = 0; k < classes; ++k) {
        const acc_t* __restrict src = x + k * kRowTile;
        acc_t* __restrict dst = workspace + (first / kRowTile * classes + k) * kRowTile;
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t r = 0; r < rows; ++r) {
          dst[r] = src[r] * row_inverse[r];
          sum += dst[r];
        }
        mass[k] += sum;
      }
    });
    const std::vector<acc_t> first_potential = potential;

    // Iteration t rescales P1 by e^(a_t - a_1) class by class and renormalizes rows (sinkhorn_math.h):
    // the workspace is read, never rewritten, so an iteration streams the matrix once, and every
    // iteration's assignment is one rounding away from P1 rather than t - 1.
    for (int64_t iter = 2; iter <= num_iters; ++iter) {
      for (int64_t k = 0; k < classes; ++k) {
        for (int64_t blk = 1; blk < num_blocks; ++blk) column_mass[k] += column_mass[blk * classes + k];
        potential[k] += class_potential_step(log_r[k], log_num_samples, column_mass[k]);
      }
      acc_t max_shift = -std::numeric_limits<acc_t>::infinity();
      for (int64_t k = 0; k < classes; ++k) max_shift = std::max(max_shift, potential[k] - first_potential[k]);
      for (int64_t k = 0; k < classes; ++k) rescale[k] = std::exp(potential[k] - first_potential[k] - max_shift);
      const bool last = iter == num_iters;
      std::fill(column_mass.begin(), column_mass.end(), acc_t(0));
      for_each_tile([&](acc_t* x, int64_t first, int64_t rows, int64_t blk) {
        acc_t row_sum[kRowTile] = {};
        for (int64_t k = 0; k < classes; ++k) {
          const acc_t* __restrict kept = workspace + (first / kRowTile * classes + k) * kRowTile;
          acc_t* __restrict column = x + k * kRowTile;
          const acc_t weight = rescale[k];
          for (int64_t r = 0; r < rows; ++r) {
            column[r] = kept[r] * weight;
            row_sum[r] += column[r];
          }
        }
        int underflow = 0;  // checked apart, so that the common case is two vector loops
        for (int64_t r = 0; r < rows; ++r) underflow |= row_sum[r] < rescaled_row_floor<acc_t>();
        if (underflow)
          for (int64_t r = 0; r < rows; ++r)
            if (row_sum[r] < rescaled_row_floor<acc_t>()) {
              recompute_row(s + (first + r) * row_stride, potential.data(), inv_epsilon, classes, x + r);
              row_sum[r] = acc_t(1);
            }
        for (int64_t r = 0; r < rows; ++r) row_sum[r] = acc_t(1) / row_sum[r];  // now the row's normalizing factor
        if (last) {
          store_tile(x, row_sum, first, rows);
          return;
        }
        acc_t* mass = column_mass.data() + blk * classes;
        for (int64_t k = 0; k < classes; ++k) {
          const acc_t* __restrict column = x + k * kRowTile;
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t r = 0; r < rows; ++r) sum += column[r] * row_sum[r];
          mass[k] += sum;
        }
      });
    }
  }
}

at::Tensor balanced_sinkhorn_cpu(const at::Tensor& scores, const at::Tensor& class_prior, double epsilon,
                                 int64_t num_iters) {
  check_sinkhorn_inputs(scores, class_prior, epsilon, num_iters);
  const at::Tensor rows = scores.stride(2) == 1 ? scores : scores.contiguous();
  at::Tensor assignment = empty_large_output(scores.sizes(), scores.options());
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
