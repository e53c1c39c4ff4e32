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

// x[k][r] = scores[i0 + r][k] / ε + shift[k] for the tile's rows; false if a value is not finite.
template <typename scalar_t, typename acc_t>
bool load_scaled_tile(const scalar_t* scores, int64_t row_stride, int64_t i0, int64_t rows, int64_t classes,
                      acc_t inv_epsilon, const acc_t* shift, acc_t* x) {
  transpose(scores + i0 * row_stride, row_stride, rows, classes, x, kRowTile);
  int finite = 1;
  for (int64_t k = 0; k < classes; ++k) {
    acc_t* __restrict column = x + k * kRowTile;
    const acc_t offset = shift[k];
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t value = column[r] * inv_epsilon + offset;
      finite &= (value - value == acc_t(0));  // false for NaN and ±inf
      column[r] = value;
    }
  }
  return finite != 0;
}

// Each class keeps kLanes running log-sum-exps, lane l taking the rows r ≡ l (mod kLanes) of every
// tile, so a full tile costs whole-register operations only: no horizontal reduction and no scalar
// exp per tile and class. The lanes are merged once per call, in block and lane order.
// Folds the tile's columns into the lanes of their class: lane_max/lane_sum[k * kLanes + l].
template <typename acc_t>
void accumulate_column_logsumexp(const acc_t* x, int64_t rows, int64_t classes, acc_t* lane_max, acc_t* lane_sum) {
  using Lanes = LanesOf<acc_t>;
  for (int64_t k = 0; k < classes; ++k) {
    const acc_t* column = x + k * kRowTile;
    acc_t* class_max = lane_max + k * kLanes;
    acc_t* class_sum = lane_sum + k * kLanes;
    if (rows < kRowTile) {  // the last tile of a problem
      for (int64_t r = 0; r < rows; ++r) {
        OnlineLogSumExp<acc_t> lane{class_max[r % kLanes], class_sum[r % kLanes]};
        lane.add(column[r]);
        class_max[r % kLanes] = lane.max;
        class_sum[r % kLanes] = lane.sum;
      }
      continue;
    }
    Lanes max = load_lanes<Lanes>(class_max);
    for (int64_t r = 0; r < kRowTile; r += kLanes) max = lanes_max(max, load_lanes<Lanes>(column + r));
    Lanes sum = load_lanes<Lanes>(class_sum) * vector_exp(load_lanes<Lanes>(class_max) - max);
    for (int64_t r = 0; r < kRowTile; r += kLanes) sum += vector_exp(load_lanes<Lanes>(column + r) - max);
    store_lanes(class_max, max);
    store_lanes(class_sum, sum);
  }
}

// In place: x[k][r] <- softmax over k of x[k][r].
template <typename acc_t>
void tile_row_softmax(acc_t* __restrict x, int64_t rows, int64_t classes) {
  acc_t row_max[kRowTile], row_sum[kRowTile];
  std::fill(row_max, row_max + rows, -std::numeric_limits<acc_t>::infinity());
  std::fill(row_sum, row_sum + rows, acc_t(0));
  for (int64_t k = 0; k < classes; ++k) {
    const acc_t* __restrict column = x + k * kRowTile;
    for (int64_t r = 0; r < rows; ++r) row_max[r] = column[r] > row_max[r] ? column[r] : row_max[r];
  }
  for (int64_t k = 0; k < classes; ++k) {
    acc_t* __restrict column = x + k * kRowTile;
    for (int64_t r = 0; r < rows; ++r) {
      column[r] = vector_exp(column[r] - row_max[r]);
      row_sum[r] += column[r];
    }
  }
  for (int64_t r = 0; r < rows; ++r) row_sum[r] = acc_t(1) / row_sum[r];
  for (int64_t k = 0; k < classes; ++k) {
    acc_t* __restrict column = x + k * kRowTile;
    for (int64_t r = 0; r < rows; ++r) column[r] *= row_sum[r];
  }
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
  std::vector<acc_t> column_mass(num_blocks * classes), potential(classes), rescale(classes), no_shift(classes, acc_t(0));
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
      if (!load_scaled_tile(s, row_stride, first, rows, classes, inv_epsilon, no_shift.data(), x)) non_finite = true;
      const int64_t lanes = blk * classes * kLanes;
      accumulate_column_logsumexp(x, rows, classes, lane_max.data() + lanes, lane_sum.data() + lanes);
    });
    TORCH_CHECK_VALUE(!non_finite, "balanced_sinkhorn: scores / epsilon has NaN or infinite values (problem ", b,
                      " of ", batch, ")");
    for (int64_t k = 0; k < classes; ++k) {
      OnlineLogSumExp<acc_t> column_lse;
      for (int64_t blk = 0; blk < num_blocks; ++blk)
        for (int64_t l = 0; l < kLanes; ++l) {
          const int64_t lane = (blk * classes + k) * kLanes + l;
          column_lse.merge(OnlineLogSumExp<acc_t>{lane_max[lane], lane_sum[lane]});
        }
      potential[k] = initial_class_potential(log_r[k], column_lse.value());
    }

    // out[first + r][k] = x[k][r]
    auto store_tile = [&](const acc_t* x, int64_t first, int64_t rows) {
      transpose(x, kRowTile, classes, rows, out + first * classes, classes);
    };
    if (num_iters == 1) {
      for_each_tile([&](acc_t* x, int64_t first, int64_t rows, int64_t) {
        load_scaled_tile(s, row_stride, first, rows, classes, inv_epsilon, potential.data(), x);
        tile_row_softmax(x, rows, classes);
        store_tile(x, first, rows);
      });
      continue;
    }

    // Iteration 1 ends with the row softmax P1 of S/ε + a, computed from the scores once and kept
    // in the workspace with its column masses.
    std::fill(column_mass.begin(), column_mass.end(), acc_t(0));
    for_each_tile([&](acc_t* x, int64_t first, int64_t rows, int64_t blk) {
      load_scaled_tile(s, row_stride, first, rows, classes, inv_epsilon, potential.data(), x);
      tile_row_softmax(x, rows, classes);
      acc_t* mass = column_mass.data() + blk * classes;
      for (int64_t k = 0; k < classes; ++k) {
        const acc_t* __restrict src = x + k * kRowTile;
        acc_t* __restrict dst = workspace + (first / kRowTile * classes + k) * kRowTile;
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t r = 0; r < rows; ++r) {
          dst[r] = src[r];
          sum += src[r];
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
        for (int64_t r = 0; r < rows; ++r) {
          if (row_sum[r] < rescaled_row_floor<acc_t>()) {
            recompute_row(s + (first + r) * row_stride, potential.data(), inv_epsilon, classes, x + r);
            row_sum[r] = acc_t(1);
          }
          row_sum[r] = acc_t(1) / row_sum[r];  // from here on, the row's normalizing factor
        }
        if (last) {
          for (int64_t k = 0; k < classes; ++k) {
            acc_t* __restrict column = x + k * kRowTile;
            for (int64_t r = 0; r < rows; ++r) column[r] *= row_sum[r];
          }
          store_tile(x, first, rows);
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
  at::Tensor assignment = at::empty(scores.sizes(), scores.options().memory_format(at::MemoryFormat::Contiguous));
  if (assignment.numel() == 0) return assignment;
  prefer_huge_pages(assignment.data_ptr(), assignment.nbytes());
  CPSL_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "balanced_sinkhorn_cpu", [&] {
    const at::Tensor log_prior = normalized_log_prior(class_prior, c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value);
    sinkhorn_kernel<scalar_t>(rows, log_prior, epsilon, num_iters, assignment);
  });
  return assignment;
}

}  // namespace

TORCH_LIBRARY_IMPL(cpsl_ops, CPU, m) { m.impl("balanced_sinkhorn", &balanced_sinkhorn_cpu); }

}  // namespace cpsl_ops
