// The passes of the current CUDA Sinkhorn kernel over one chunk of rows, for K <= 32 (larger K
// takes the previous generation's: previous/sinkhorn_passes.cuh). Math: sinkhorn_math.h; phases,
// merges and launch: sinkhorn_common.cuh, sinkhorn_kernels.cuh.
//
// A block of 4 warps takes a chunk of kRowsPerChunk rows, each warp a contiguous span of 256 rows
// in groups of 32. Every load is lane k reading class k of one row, so a warp load is one row's K
// consecutive scores (one or two cache lines), and a lane has 16 rows' loads in flight before it
// uses the first; nothing waits on a shuffle or sits behind a data-dependent branch.
//   column log-sum-exp  lane k folds its loads straight into class k's branch-free online
//                       log-sum-exp (sinkhorn_math.h);
//   row softmax         the group's rows go through a shared-memory tile, where lane r takes row
//                       r's softmax in registers, against the class maxima and potentials of the
//                       chunk's problem in shared memory, and writes it back; then lane k adds
//                       class k's column to its mass, or writes it to the assignment.
// A thread reading its own row from global memory instead would touch ~K cache lines per load
// instruction, K times the L1 wavefronts: ~7 B per wavefront at K = 19 in fp32, below the
// bandwidth floor (about 1.7 TB/s on 132 SMs). The tile's row stride is odd, so a lane's row and a
// lane's column are both free of bank conflicts. Each class's partials are merged over the block's
// warps in warp order, so a chunk's partials do not depend on which block computed it.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpsl_ops/cuda_launch.cuh"
#include "cpsl_ops/sinkhorn_math.h"
#include "sinkhorn_common.cuh"

namespace cpsl_ops {
namespace sinkhorn_kernels {

constexpr int kRowThreads = 128;
constexpr int kRowWarps = kRowThreads / cuda::kWarp;
constexpr int kGroupRows = cuda::kWarp;  // a row per lane
constexpr int kGroupsPerWarp = kRowsPerChunk / (kRowWarps * kGroupRows);
constexpr int kMaxRowClasses = cuda::kWarp;  // a lane per class
static_assert(kGroupsPerWarp * kRowWarps * kGroupRows == kRowsPerChunk, "a chunk is whole groups of every warp");

// Shared memory of a block whose rows hold up to kClasses classes (K rounded up to a multiple of 8:
// a row's registers).
template <int kClasses, typename acc_t>
struct RowScratch {
  static constexpr int kStride = kClasses + 1;  // odd (kClasses is a multiple of 8): see the header
  acc_t tile[kRowWarps][kGroupRows * kStride];
  acc_t class_max[kClasses], potential[kClasses];  // of the chunk's problem
  acc_t warp_max[kRowWarps][kClasses], warp_sum[kRowWarps][kClasses];
};

constexpr int kRowsInFlight = 16;  // loads per lane: at K = 19 in fp32, 1.2 KB per warp

// use(r, S[r][lane]) for the group's rows r in order, for a lane below K; `column` is the lane's
// class in the group's first row.
template <typename acc_t, typename scalar_t, typename Use>
__device__ __forceinline__ void for_each_score(const scalar_t* column, int64_t row_stride, int rows, Use&& use) {
#pragma unroll 1
  for (int first = 0; first < kGroupRows; first += kRowsInFlight) {
    acc_t scores[kRowsInFlight];
#pragma unroll
    for (int r = 0; r < kRowsInFlight; ++r)
      if (first + r < rows) scores[r] = static_cast<acc_t>(column[(first + r) * row_stride]);
#pragma unroll
    for (int r = 0; r < kRowsInFlight; ++r)
      if (first + r < rows) use(first + r, scores[r]);
  }
}

// The softmax of x + potential over one tile row, in place, x = (S - M)/ε with M each class's
// largest score, subtracted in score units (sinkhorn_math.h). False if an x is not finite: the
// scores are (the column pass checked), but a class spreads so widely that it overflows.
template <int kClasses, typename acc_t>
__device__ __forceinline__ bool tile_row_softmax(acc_t* row, const acc_t* class_max, const acc_t* potential,
                                                 int classes, acc_t inv_epsilon) {
  acc_t values[kClasses];
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  bool finite = true;
#pragma unroll
  for (int k = 0; k < kClasses; ++k) {
    const acc_t x = k < classes ? (row[k] - class_max[k]) * inv_epsilon : acc_t(0);
    finite &= isfinite(x);
    values[k] = k < classes ? x + potential[k] : -std::numeric_limits<acc_t>::infinity();
    max = values[k] > max ? values[k] : max;
  }
  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < kClasses; ++k) {
    values[k] = exp(values[k] - max);
    sum += values[k];
  }
  const acc_t inverse = acc_t(1) / sum;
#pragma unroll
  for (int k = 0; k < kClasses; ++k)
    if (k < classes) row[k] = values[k] * inverse;
  return finite;
}

struct Group {
  int64_t first;
  int rows;  // at most kGroupRows; none past the chunk's end
};

// The warp's g-th group of rows in the chunk.
__device__ __forceinline__ Group warp_group(const ChunkRows& rows, int warp, int g) {
  const int64_t first = rows.first + static_cast<int64_t>(warp * kGroupsPerWarp + g) * kGroupRows;
  return {first, static_cast<int>(max(int64_t(0), min(int64_t(kGroupRows), rows.last - first)))};
}

// Per-class running log-sum-exp over the chunk's rows, in score units (its max is the chunk's
// largest score, its sum that of exp((S - max)/ε)), merged over warps in warp order. Lane k reads
// class k straight into its log-sum-exp: no tile.
template <int kClasses, typename scalar_t, typename acc_t>
__device__ void row_column_logsumexp(const SinkhornArgs<scalar_t, acc_t>& a, int64_t chunk,
                                     RowScratch<kClasses, acc_t>& scratch) {
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp, classes = a.classes;
  const ChunkRows rows = chunk_rows(a, chunk);
  OnlineLogSumExp<acc_t> lse;
  bool finite = true;
  if (lane < classes) {
#pragma unroll 1
    for (int g = 0; g < kGroupsPerWarp; ++g) {
      const Group group = warp_group(rows, warp, g);
      if (group.rows == 0) break;
      for_each_score<acc_t>(a.scores + rows.problem * a.batch_stride + group.first * a.row_stride + lane,
                            a.row_stride, group.rows, [&](int, acc_t score) {
                              finite &= isfinite(score);
                              lse.add(score, a.inv_epsilon);
                            });
    }
    scratch.warp_max[warp][lane] = lse.max;
    scratch.warp_sum[warp][lane] = lse.sum;
  }
  if (!finite) a.flags[kNonFiniteScores] = 1;
  __syncthreads();
  if (threadIdx.x < classes) {
    OnlineLogSumExp<acc_t> merged;
    for (int w = 0; w < kRowWarps; ++w)
      merged.merge(OnlineLogSumExp<acc_t>{scratch.warp_max[w][threadIdx.x], scratch.warp_sum[w][threadIdx.x]},
                   a.inv_epsilon);
    a.partial_max[chunk * classes + threadIdx.x] = merged.max;
    a.partial_sum[chunk * classes + threadIdx.x] = merged.sum;
  }
  __syncthreads();  // the block's next chunk rewrites the warp partials
}

// Per-class sums of the current row softmax over the chunk's rows (summed over warps in warp
// order), or, with kWriteAssignment, the softmax itself written out.
template <bool kWriteAssignment, int kClasses, typename scalar_t, typename acc_t>
__device__ void row_softmax_pass(const SinkhornArgs<scalar_t, acc_t>& a, int64_t chunk,
                                 RowScratch<kClasses, acc_t>& scratch) {
  constexpr int kStride = RowScratch<kClasses, acc_t>::kStride;
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp, classes = a.classes;
  const ChunkRows rows = chunk_rows(a, chunk);
  if (threadIdx.x < classes) {
    scratch.class_max[threadIdx.x] = a.class_max[rows.problem * classes + threadIdx.x];
    scratch.potential[threadIdx.x] = a.potential[rows.problem * classes + threadIdx.x];
  }
  __syncthreads();
  acc_t* tile = scratch.tile[warp];
  acc_t mass = 0;
  bool finite = true;
#pragma unroll 1
  for (int g = 0; g < kGroupsPerWarp; ++g) {
    const Group group = warp_group(rows, warp, g);
    if (group.rows == 0) break;
    if (lane < classes)
      for_each_score<acc_t>(a.scores + rows.problem * a.batch_stride + group.first * a.row_stride + lane,
                            a.row_stride, group.rows,
                            [&](int r, acc_t score) { tile[r * kStride + lane] = score; });
    __syncwarp();
    if (lane < group.rows)
      finite &= tile_row_softmax<kClasses>(tile + lane * kStride, scratch.class_max, scratch.potential, classes,
                                           a.inv_epsilon);
    __syncwarp();
    if (lane < classes) {
      scalar_t* out = a.out + (rows.problem * a.samples + group.first) * classes + lane;
      for (int r = 0; r < group.rows; ++r) {
        if constexpr (kWriteAssignment) {
          out[r * classes] = static_cast<scalar_t>(tile[r * kStride + lane]);
        } else {
          mass += tile[r * kStride + lane];
        }
      }
    }
    __syncwarp();  // the next group rewrites the tile
  }
  if (!finite) a.flags[kSpreadOverflow] = 1;
  if constexpr (!kWriteAssignment) {
    if (lane < classes) scratch.warp_sum[warp][lane] = mass;
    __syncthreads();
    if (threadIdx.x < classes) {
      acc_t total = 0;
      for (int w = 0; w < kRowWarps; ++w) total += scratch.warp_sum[w][threadIdx.x];
      a.partial_sum[chunk * classes + threadIdx.x] = total;
    }
  }
  __syncthreads();  // the block's next chunk rewrites the class maxima, potentials and warp partials
}

// A merge phase with a warp per (problem, class) pair: lane l folds chunks l, l + 32, ... in
// order, then the warp folds its lanes in a fixed tree. A thread per pair (sinkhorn_common.cuh)
// reads a problem's chunks one after another: ~5 us per merge at CPSL's size (65 chunks), ~100 us
// at 16 times it, against a floor of 47 us for the whole call.
template <typename scalar_t, typename acc_t>
__device__ void run_warp_merge_phase(const SinkhornArgs<scalar_t, acc_t>& a, int64_t phase) {
  const int lane = threadIdx.x % cuda::kWarp;
  const int64_t pairs = a.batch * a.classes, warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / cuda::kWarp);
  for (int64_t pair = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / cuda::kWarp; pair < pairs;
       pair += warps) {
    const int64_t b = pair / a.classes, k = pair % a.classes;
    const acc_t* partial_max = a.partial_max + b * a.chunks_per_problem * a.classes + k;
    const acc_t* partial_sum = a.partial_sum + b * a.chunks_per_problem * a.classes + k;
    if (phase == 1) {
      OnlineLogSumExp<acc_t> merged;
      for (int64_t c = lane; c < a.chunks_per_problem; c += cuda::kWarp)
        merged.merge(OnlineLogSumExp<acc_t>{partial_max[c * a.classes], partial_sum[c * a.classes]}, a.inv_epsilon);
      for (int offset = cuda::kWarp / 2; offset > 0; offset /= 2)
        merged.merge(OnlineLogSumExp<acc_t>{__shfl_xor_sync(0xffffffffu, merged.max, offset),
                                            __shfl_xor_sync(0xffffffffu, merged.sum, offset)},
                     a.inv_epsilon);
      if (lane == 0) {
        a.class_max[pair] = merged.max;  // the log-sum-exp of x = (S - M)/ε is log(merged.sum)
        a.potential[pair] = initial_class_potential(a.log_prior[pair], std::log(merged.sum));
      }
    } else {
      acc_t mass = 0;
      for (int64_t c = lane; c < a.chunks_per_problem; c += cuda::kWarp) mass += partial_sum[c * a.classes];
      mass = cuda::warp_sum(mass);
      if (lane == 0) a.potential[pair] += class_potential_step(a.log_prior[pair], a.log_num_samples, mass);
    }
  }
}

}  // namespace sinkhorn_kernels
}  // namespace cpsl_ops
