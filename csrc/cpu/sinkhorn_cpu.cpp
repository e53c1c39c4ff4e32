// CPU kernel of cpsl_ops::balanced_sinkhorn (schema: ops/sinkhorn.cpp; math: sinkhorn_math.h).
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "cpsl_ops/cpu_math.h"
#include "cpsl_ops/cpu_memory.h"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/sinkhorn_math.h"
#include "cpsl_ops/sinkhorn_prior.h"
#include "cpsl_ops/stable.h"

namespace cpsl_ops {
namespace {

// Rows per tile. A tile is held class-major, x[k * kRowTile + r], so that every loop runs over
// contiguous rows and vectorizes, whatever K is.
constexpr int64_t kRowTile = 64;
// How far above the reference R_k (x units) a class's largest score may rise before the first pass
// is run again with the exact maxima: x up to 8 keeps fp32's absolute precision near 1e-6.
constexpr double kReferenceSlack = 8;

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

// x = (S - R)/ε, the scores the kernel works with: R_k, the largest score of class k (or of a
// sample of its rows, within kReferenceSlack of it), is subtracted in score units before the
// scaling, so that adding a constant to one class's scores (a masked class, say) leaves every x
// unchanged wherever the shifted scores are exact, however large the constant, and x keeps the
// scores' precision near each class's top. The iteration itself is invariant to such a shift (its
// first step normalizes each class).
template <typename acc_t>
struct ScaledScores {
  acc_t inv_epsilon;
  const acc_t* reference;  // R_k, K values

  acc_t operator()(acc_t score, int64_t k) const { return (score - reference[k]) * inv_epsilon; }
};

// Column log-sum-exps in score units, read in the rows' own order with no transpose: kLanes rows
// hold `classes` whole registers, and register j of every such group holds the same positions
// p = (row mod kLanes) * classes + k, so each position keeps its own running log-sum-exp with
// whole-register operations only: position_max[p] its largest score, position_sum[p] the sum of
// exp((S - position_max)/ε), each difference taken in score units. The positions of a class are
// merged once per call (so this pass also gives each class's largest score). Folds a tile's rows
// into position_max/position_sum (kLanes * classes each); false if a score is not finite.
template <typename acc_t>
bool accumulate_column_logsumexp(const acc_t* rows_data, int64_t rows, int64_t classes, acc_t inv_epsilon,
                                 acc_t* position_max, acc_t* position_sum) {
  using Lanes = LanesOf<acc_t>;
  const int64_t group = kLanes * classes, groups = rows / kLanes;
  // Sums value - value: 0 while every value is finite, NaN after an inf or NaN. Read in row order,
  // which also brings the tile into L1 for the class-strided loops below.
  Lanes not_finite = {};
  for (int64_t i = 0; i < groups * group; i += kLanes) {
    const Lanes value = load_lanes<Lanes>(rows_data + i);
    not_finite += value - value;
  }
  if (groups > 0)
    for (int64_t j = 0; j < classes; ++j) {
      const acc_t* values = rows_data + j * kLanes;
      Lanes tile_max = load_lanes<Lanes>(values);
      for (int64_t g = 1; g < groups; ++g) tile_max = lanes_max(tile_max, load_lanes<Lanes>(values + g * group));
      const Lanes old_max = load_lanes<Lanes>(position_max + j * kLanes);
      const Lanes max = lanes_max(old_max, tile_max);
      Lanes sum = load_lanes<Lanes>(position_sum + j * kLanes) * vector_exp((old_max - max) * inv_epsilon);
      for (int64_t g = 0; g < groups; ++g) sum += vector_exp((load_lanes<Lanes>(values + g * group) - max) * inv_epsilon);
      store_lanes(position_max + j * kLanes, max);
      store_lanes(position_sum + j * kLanes, sum);
    }
  bool finite = true;
  for (int64_t l = 0; l < kLanes; ++l) finite &= not_finite[l] == acc_t(0);
  for (int64_t r = groups * kLanes; r < rows; ++r)  // the last rows of a problem
    for (int64_t k = 0; k < classes; ++k) {
      const acc_t score = rows_data[r * classes + k];
      finite &= score - score == acc_t(0);
      const int64_t position = (r % kLanes) * classes + k;
      OnlineLogSumExp<acc_t> lse{position_max[position], position_sum[position]};
      lse.add(score, inv_epsilon);
      position_max[position] = lse.max;
      position_sum[position] = lse.sum;
    }
  return finite;
}

// kept[k][r] <- exp(x[first + r][k] + potential[k] - m_r), m_r being the row's largest exponent,
// and row_weight[r] = exp(m_r - tile_max) with tile_max the largest m_r: kept · row_weight is
// exp(x + potential - tile_max), from which the column sums of the tile follow without another
// exponential. Returns false if an x is -inf (NaN and +inf turn the exponentials into NaN instead).
template <typename scalar_t, typename acc_t>
bool tile_row_exponentials(const scalar_t* scores, int64_t row_stride, int64_t first, int64_t rows,
                           int64_t classes, const ScaledScores<acc_t>& scale, const acc_t* potential,
                           acc_t* __restrict kept, acc_t* __restrict row_weight, acc_t& tile_max) {
  constexpr acc_t kInfinity = std::numeric_limits<acc_t>::infinity();
  transpose(scores + first * row_stride, row_stride, rows, classes, kept, kRowTile);
  acc_t row_max[kRowTile], row_min[kRowTile];
  std::fill(row_max, row_max + rows, -kInfinity);
  std::fill(row_min, row_min + rows, kInfinity);
  for (int64_t k = 0; k < classes; ++k) {
    acc_t* __restrict column = kept + k * kRowTile;
    const acc_t reference = scale.reference[k], inv_epsilon = scale.inv_epsilon, shift = potential[k];
    for (int64_t r = 0; r < rows; ++r) {
      column[r] = (column[r] - reference) * inv_epsilon + shift;
      row_max[r] = column[r] > row_max[r] ? column[r] : row_max[r];
      row_min[r] = column[r] < row_min[r] ? column[r] : row_min[r];
    }
  }
  for (int64_t k = 0; k < classes; ++k) {
    acc_t* __restrict column = kept + k * kRowTile;
    for (int64_t r = 0; r < rows; ++r) column[r] = vector_exp(column[r] - row_max[r]);
  }
  tile_max = -kInfinity;
  acc_t lowest = kInfinity;
  for (int64_t r = 0; r < rows; ++r) {
    tile_max = std::max(tile_max, row_max[r]);
    lowest = std::min(lowest, row_min[r]);
  }
  for (int64_t r = 0; r < rows; ++r) row_weight[r] = vector_exp(row_max[r] - tile_max);
  return lowest > -kInfinity;
}

// Up to 16 tiles spread over a problem, sampled for a first guess of M and to choose the design of
// the first pass.
struct SampledTiles {
  int64_t samples, tiles, count;
  explicit SampledTiles(int64_t num_samples)
      : samples(num_samples), tiles((num_samples + kRowTile - 1) / kRowTile), count(std::min<int64_t>(tiles, 16)) {}
  int64_t first(int64_t i) const { return i * tiles / count * kRowTile; }
  int64_t rows(int64_t i) const { return std::min(kRowTile, samples - first(i)); }
};

// reference[k] = the largest score of class k in the sampled tiles: a first guess of M_k that
// takes no pass of its own (the maximum of shifted scores is the shifted maximum, exactly).
template <typename scalar_t, typename acc_t>
void sampled_class_maxima(const scalar_t* scores, int64_t row_stride, const SampledTiles& sample, int64_t classes,
                          acc_t* reference) {
  std::fill(reference, reference + classes, -std::numeric_limits<acc_t>::infinity());
  for (int64_t i = 0; i < sample.count; ++i)
    for (int64_t r = sample.first(i); r < sample.first(i) + sample.rows(i); ++r)
      for (int64_t k = 0; k < classes; ++k)
        reference[k] = std::max(reference[k], static_cast<acc_t>(scores[r * row_stride + k]));
}

// Folds a tile's rows (contiguous, row-major) into position_max (kLanes * classes, in the lanes
// form of accumulate_column_logsumexp): position p keeps the largest score of class p mod K.
template <typename acc_t>
void accumulate_class_maxima(const acc_t* rows_data, int64_t rows, int64_t classes, acc_t* position_max) {
  using Lanes = LanesOf<acc_t>;
  const int64_t group = kLanes * classes, groups = rows / kLanes;
  for (int64_t j = 0; j < classes && groups > 0; ++j) {
    Lanes max = load_lanes<Lanes>(position_max + j * kLanes);
    for (int64_t g = 0; g < groups; ++g) max = lanes_max(max, load_lanes<Lanes>(rows_data + g * group + j * kLanes));
    store_lanes(position_max + j * kLanes, max);
  }
  for (int64_t r = groups * kLanes; r < rows; ++r)
    for (int64_t k = 0; k < classes; ++k) {
      acc_t& max = position_max[(r % kLanes) * classes + k];
      max = std::max(max, rows_data[r * classes + k]);
    }
}

// Whether the first pass should take one exponential per score (tile_row_exponentials) rather
// than two: in the sampled tiles, at most a quarter may hold a class whose best x lies more than
// spread below the tile's best one. Such a tile needs its column sums from the scores again, and
// scores spread that widely (logits, small ε) are faster with two passes.
template <typename scalar_t, typename acc_t>
bool mostly_narrow_tiles(const scalar_t* scores, int64_t row_stride, const SampledTiles& sample, int64_t classes,
                         const ScaledScores<acc_t>& scale, acc_t spread, acc_t* class_max) {
  int64_t wide = 0;
  for (int64_t i = 0; i < sample.count; ++i) {
    std::fill(class_max, class_max + classes, -std::numeric_limits<acc_t>::infinity());
    for (int64_t r = sample.first(i); r < sample.first(i) + sample.rows(i); ++r)
      for (int64_t k = 0; k < classes; ++k)
        class_max[k] = std::max(class_max[k], scale(static_cast<acc_t>(scores[r * row_stride + k]), k));
    const auto [lowest, highest] = std::minmax_element(class_max, class_max + classes);
    wide += *highest - *lowest > spread;
  }
  return 4 * wide <= sample.count;
}

// mass[k] += Σ_r tile[k][r] · row_factor[r]: a tile's contribution to the column masses of its
// row-normalized assignment.
template <typename acc_t>
void add_column_masses(const acc_t* tile, const acc_t* row_factor, int64_t rows, int64_t classes, acc_t* mass) {
  for (int64_t k = 0; k < classes; ++k) {
    const acc_t* __restrict column = tile + k * kRowTile;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t r = 0; r < rows; ++r) sum += column[r] * row_factor[r];
    mass[k] += sum;
  }
}

// x[k * kRowTile] = softmax over k of (x_k + potential[k]) of one row, from the scores, exactly.
template <typename scalar_t, typename acc_t>
void recompute_row(const scalar_t* row, const acc_t* potential, const ScaledScores<acc_t>& scale, int64_t classes,
                   acc_t* x) {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = 0; k < classes; ++k) max = std::max(max, scale(static_cast<acc_t>(row[k]), k) + potential[k]);
  acc_t sum = 0;
  for (int64_t k = 0; k < classes; ++k) {
    x[k * kRowTile] = std::exp(scale(static_cast<acc_t>(row[k]), k) + potential[k] - max);
    sum += x[k * kRowTile];
  }
  for (int64_t k = 0; k < classes; ++k) x[k * kRowTile] /= sum;
}

template <typename scalar_t>
void sinkhorn_kernel(const Tensor& scores, const acc_type<scalar_t>* log_r_all, double epsilon, int64_t num_iters,
                     const Tensor& assignment) {
  using acc_t = acc_type<scalar_t>;
  constexpr acc_t kInfinity = std::numeric_limits<acc_t>::infinity();
  const int64_t batch = scores.size(0), samples = scores.size(1), classes = scores.size(2);
  const int64_t tiles = (samples + kRowTile - 1) / kRowTile;
  const int64_t tiles_per_block = deterministic_block_size(tiles, 8, 256);
  const int64_t num_blocks = (tiles + tiles_per_block - 1) / tiles_per_block;
  const acc_t inv_epsilon = acc_t(1) / static_cast<acc_t>(epsilon);
  const acc_t log_num_samples = std::log(static_cast<acc_t>(samples));
  const int64_t row_stride = scores.stride(1);
  // A tile with a column sum (relative to the tile's best exponent) below this takes its column
  // sums from the scores instead, so that the exponentials flushed to zero are negligible against
  // every sum that is merged.
  const acc_t sum_floor = rescaled_row_floor<acc_t>(), floor_depth = -std::log(sum_floor);
  // Potentials spread over less than this keep every rescaled row of the kept exponentials (whose
  // row maxima are 1) above rescaled_row_floor.
  const acc_t spread_limit = floor_depth - acc_t(1);

  // Per block and class, a running Σ exp(x - block_reference) over the block's rows.
  std::vector<acc_t> block_reference(num_blocks * classes), block_sum(num_blocks * classes);
  // Per block, the running log-sum-exps of the tiles whose column sums needed the scores again.
  std::vector<acc_t> lane_max(num_blocks * classes * kLanes), lane_sum(num_blocks * classes * kLanes);
  std::vector<acc_t> column_mass(num_blocks * classes), potential(classes), kept_potential(classes), rescale(classes);
  std::vector<acc_t> tile_class_max(classes), reference(classes);
  std::vector<acc_t> block_top(num_blocks);  // per block, the largest x of the one-exponential first pass
  // The kept matrix (E or the first assignment, see below), tile by tile as the tiles hold it
  // (class-major inside a tile), so that a tile is one contiguous block of K × kRowTile values to
  // stream in.
  // It is kept from call to call of the same thread (one per dtype): a fresh buffer this large
  // would be page-faulted in and zeroed by the OS on every call, which costs as much as a pass.
  static thread_local std::vector<acc_t> cached_workspace;
  const int64_t workspace_size = tiles * classes * kRowTile;
  if (cached_workspace.size() < static_cast<size_t>(workspace_size)) cached_workspace.resize(workspace_size);
  acc_t* const workspace = cached_workspace.data();
  for (int64_t b = 0; b < batch; ++b) {
    const scalar_t* s = data_of<const scalar_t>(scores) + b * scores.stride(0);
    scalar_t* out = data_of<scalar_t>(assignment) + b * samples * classes;
    const acc_t* log_r = log_r_all + b * classes;

    // Runs visit(tile_buffer, first_row, rows, block) over every tile, in parallel over blocks.
    auto for_each_tile = [&](auto&& visit) {
      torch::stable::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
        std::vector<acc_t> x(classes * kRowTile);
        for (int64_t blk = block_begin; blk < block_end; ++blk)
          for (int64_t t = blk * tiles_per_block; t < std::min(tiles, (blk + 1) * tiles_per_block); ++t) {
            const int64_t first = t * kRowTile, rows = std::min(kRowTile, samples - first);
            visit(x.data(), first, rows, blk);
          }
      });
    };
    auto kept_tile = [&](int64_t first) { return workspace + first / kRowTile * classes * kRowTile; };

    // x = (S - R)/ε takes R = the class maxima over the sampled tiles, which cost no pass of their
    // own. Widely spread scores take the exact maxima M from their first pass (its log-sum-exps are
    // in score units); the one-exponential design, whose kept exponentials are of x, notes the
    // largest x it meets and, in the rare case that some class rises more than kReferenceSlack
    // above R (R far below a class's top would cost x the scores' precision there, where the mass
    // is), takes M in a read-only pass and runs its first pass again with R = M.
    const SampledTiles sample(samples);
    sampled_class_maxima(s, row_stride, sample, classes, reference.data());
    const ScaledScores<acc_t> scale{inv_epsilon, reference.data()};
    // R = M, each class's largest score, from the lanes form's per-position maxima (score units).
    auto reference_from_lane_maxima = [&] {
      std::fill(reference.begin(), reference.end(), -kInfinity);
      for (int64_t p = 0; p < num_blocks * classes * kLanes; ++p)
        reference[p % classes] = std::max(reference[p % classes], lane_max[p]);
    };
    std::atomic<bool> non_finite{false};
    bool one_exponential = false;
    for (bool rerun = false;; rerun = true) {
      // The column log-sum-exps of x give the first iteration's potentials. Either the first pass
      // takes the only exponential of every score, E = exp(x - row maximum), keeps it in the
      // workspace and takes the column sums from it too, or (widely spread scores) it takes them
      // from the scores alone and a second pass fills the workspace.
      std::fill(kept_potential.begin(), kept_potential.end(), acc_t(0));
      std::fill(block_reference.begin(), block_reference.end(), -kInfinity);
      std::fill(block_sum.begin(), block_sum.end(), acc_t(0));
      std::fill(lane_max.begin(), lane_max.end(), -kInfinity);
      std::fill(lane_sum.begin(), lane_sum.end(), acc_t(0));
      std::fill(block_top.begin(), block_top.end(), -kInfinity);
      auto accumulate_from_scores = [&](acc_t* x, int64_t first, int64_t rows, int64_t blk) {
        const int64_t positions = blk * classes * kLanes;
        if (!accumulate_column_logsumexp(contiguous_rows(s, row_stride, first, rows, classes, x), rows, classes,
                                         inv_epsilon, lane_max.data() + positions, lane_sum.data() + positions))
          non_finite = true;
      };
      one_exponential = mostly_narrow_tiles(s, row_stride, sample, classes, scale, floor_depth, tile_class_max.data());
      if (!one_exponential) for_each_tile(accumulate_from_scores);
      else
        for_each_tile([&](acc_t* x, int64_t first, int64_t rows, int64_t blk) {
          acc_t row_weight[kRowTile], tile_max;
          acc_t* const kept = kept_tile(first);
          if (!tile_row_exponentials(s, row_stride, first, rows, classes, scale, kept_potential.data(), kept,
                                     row_weight, tile_max))
            non_finite = true;
          block_top[blk] = std::max(block_top[blk], tile_max);  // the largest x (kept_potential is 0)
          acc_t* const tile_sum = x;
          bool below_floor = false;
          for (int64_t k = 0; k < classes; ++k) {
            const acc_t* __restrict column = kept + k * kRowTile;
            acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t r = 0; r < rows; ++r) sum += column[r] * row_weight[r];
            tile_sum[k] = sum;
            below_floor |= sum < sum_floor;
          }
          // Classes far below the tile's best scores: the tile's column sums come from the scores.
          if (below_floor) return accumulate_from_scores(x, first, rows, blk);
          acc_t* block_max = block_reference.data() + blk * classes;
          acc_t* block = block_sum.data() + blk * classes;
          for (int64_t k = 0; k < classes; ++k) {
            const acc_t merged = std::max(block_max[k], tile_max);
            block[k] = block[k] * vector_exp(block_max[k] - merged) + tile_sum[k] * vector_exp(tile_max - merged);
            block_max[k] = merged;
          }
        });
      if (non_finite) break;
      if (!one_exponential) {  // every tile went through the lanes form, whose maxima are M
        reference_from_lane_maxima();
      } else if (!rerun) {
        bool close = *std::max_element(block_top.begin(), block_top.end()) <= kReferenceSlack;
        for (int64_t p = 0; p < num_blocks * classes * kLanes; ++p)
          close &= scale(lane_max[p], p % classes) <= kReferenceSlack;
        if (!close) {
          std::fill(lane_max.begin(), lane_max.end(), -kInfinity);
          for_each_tile([&](acc_t* x, int64_t first, int64_t rows, int64_t blk) {
            accumulate_class_maxima(contiguous_rows(s, row_stride, first, rows, classes, x), rows, classes,
                                    lane_max.data() + blk * classes * kLanes);
          });
          reference_from_lane_maxima();
          continue;
        }
      }
      for (int64_t k = 0; k < classes; ++k) {
        OnlineLogSumExp<acc_t> column_lse;
        for (int64_t blk = 0; blk < num_blocks; ++blk) {
          column_lse.merge(OnlineLogSumExp<acc_t>{block_reference[blk * classes + k], block_sum[blk * classes + k]});
          for (int64_t l = 0; l < kLanes; ++l) {  // from score units to x
            const int64_t position = (blk * kLanes + l) * classes + k;
            column_lse.merge(OnlineLogSumExp<acc_t>{scale(lane_max[position], k), lane_sum[position]});
          }
        }
        if (!std::isfinite(column_lse.value())) non_finite = true;
        potential[k] = initial_class_potential(log_r[k], column_lse.value());
      }
      break;
    }
    CPSL_CHECK_VALUE(!non_finite, "balanced_sinkhorn: ", kNonFiniteScoresMessage, " (problem ", b,
                      " of ", batch, ")");

    // Iteration t's assignment is the workspace rescaled by e^(a_t - kept_potential) class by class
    // with its rows renormalized (sinkhorn_math.h): the workspace is read, never rewritten, so an
    // iteration streams the matrix once, and every iteration's assignment is one rounding away
    // from the workspace. E serves when the first potentials spread little enough; otherwise the
    // workspace keeps the first iteration's assignment P1, computed here with its column masses.
    int64_t first_rescaled_iteration = 1;
    const auto [lowest, highest] = std::minmax_element(potential.begin(), potential.end());
    if (!one_exponential || *highest - *lowest > spread_limit) {
      std::fill(column_mass.begin(), column_mass.end(), acc_t(0));
      for_each_tile([&](acc_t* x, int64_t first, int64_t rows, int64_t blk) {
        acc_t row_weight[kRowTile], tile_max, row_inverse[kRowTile] = {};
        acc_t* const kept = num_iters == 1 ? x : kept_tile(first);
        if (!tile_row_exponentials(s, row_stride, first, rows, classes, scale, potential.data(), kept, row_weight,
                                   tile_max))
          non_finite = true;  // an x that overflows, which the first pass of widely spread scores does not see
        for (int64_t k = 0; k < classes; ++k)
          for (int64_t r = 0; r < rows; ++r) row_inverse[r] += kept[k * kRowTile + r];
        for (int64_t r = 0; r < rows; ++r) row_inverse[r] = acc_t(1) / row_inverse[r];
        if (num_iters == 1) return transpose(kept, kRowTile, classes, rows, out + first * classes, classes, row_inverse);
        add_column_masses(kept, row_inverse, rows, classes, column_mass.data() + blk * classes);
      });
      CPSL_CHECK_VALUE(!non_finite, "balanced_sinkhorn: ", kNonFiniteScoresMessage, " (problem ", b, " of ", batch,
                       ")");
      kept_potential = potential;
      first_rescaled_iteration = 2;
    }
    for (int64_t iter = first_rescaled_iteration; iter <= num_iters; ++iter) {
      if (iter > 1)
        for (int64_t k = 0; k < classes; ++k) {
          for (int64_t blk = 1; blk < num_blocks; ++blk) column_mass[k] += column_mass[blk * classes + k];
          potential[k] += class_potential_step(log_r[k], log_num_samples, column_mass[k]);
        }
      acc_t max_shift = -kInfinity;
      for (int64_t k = 0; k < classes; ++k) max_shift = std::max(max_shift, potential[k] - kept_potential[k]);
      for (int64_t k = 0; k < classes; ++k) rescale[k] = std::exp(potential[k] - kept_potential[k] - max_shift);
      const bool last = iter == num_iters;
      std::fill(column_mass.begin(), column_mass.end(), acc_t(0));
      for_each_tile([&](acc_t* x, int64_t first, int64_t rows, int64_t blk) {
        acc_t row_sum[kRowTile] = {};
        for (int64_t k = 0; k < classes; ++k) {
          const acc_t* __restrict kept = kept_tile(first) + k * kRowTile;
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
              recompute_row(s + (first + r) * row_stride, potential.data(), scale, classes, x + r);
              row_sum[r] = acc_t(1);
            }
        for (int64_t r = 0; r < rows; ++r) row_sum[r] = acc_t(1) / row_sum[r];  // now the row's normalizing factor
        if (last) return transpose(x, kRowTile, classes, rows, out + first * classes, classes, row_sum);
        add_column_masses(x, row_sum, rows, classes, column_mass.data() + blk * classes);
      });
    }
  }
}

// log of each problem's prior normalized to sum 1, (B, K) in the accumulation type.
template <typename acc_t>
std::vector<acc_t> normalized_log_priors(const Tensor& class_prior) {
  const int64_t batch = class_prior.size(0), classes = class_prior.size(1);
  std::vector<acc_t> log_prior(batch * classes);
  bool valid = true;
  dispatch_floating(class_prior.scalar_type(), "balanced_sinkhorn", [&](auto tag) {
    using prior_t = decltype(tag);
    const prior_t* prior = data_of<const prior_t>(class_prior);
    for (int64_t b = 0; b < batch; ++b)
      valid &= normalized_log_prior(prior + b * class_prior.stride(0), class_prior.stride(1), classes,
                                    log_prior.data() + b * classes);
  });
  CPSL_CHECK_VALUE(valid, "balanced_sinkhorn: class_prior must be positive and finite in every class");
  return log_prior;
}

Tensor balanced_sinkhorn_cpu(const Tensor& scores, const Tensor& class_prior, double epsilon, int64_t num_iters) {
  check_sinkhorn_inputs(scores, class_prior, epsilon, num_iters);
  const Tensor rows = scores.stride(2) == 1 ? scores : torch::stable::contiguous(scores);
  const Tensor assignment = empty_large_output(scores, {scores.size(0), scores.size(1), scores.size(2)});
  dispatch_floating(scores.scalar_type(), "balanced_sinkhorn", [&](auto tag) {
    using scalar_t = decltype(tag);
    const std::vector<acc_type<scalar_t>> log_prior = normalized_log_priors<acc_type<scalar_t>>(class_prior);
    if (assignment.numel() > 0) sinkhorn_kernel<scalar_t>(rows, log_prior.data(), epsilon, num_iters, assignment);
  });
  return assignment;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(cpsl_ops, CPU, m) { m.impl("balanced_sinkhorn", TORCH_BOX(&balanced_sinkhorn_cpu)); }

}  // namespace cpsl_ops
