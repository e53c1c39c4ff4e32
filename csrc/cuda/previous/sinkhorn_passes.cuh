// The previous generation's passes of the CUDA Sinkhorn kernel over one chunk of rows
// (kernel_generation.h): CPSL_OPS_CUDA_KERNELS=previous, and any K above the current passes' lane
// per class (sinkhorn_passes.cuh). Math: sinkhorn_math.h; phases, merges and launch:
// sinkhorn_common.cuh and previous/sinkhorn_kernels.cuh. A chunk's partials do not depend on which
// block computed them.
//
// Two layouts of a row's classes. Narrow (K <= 256, kClassesPerLane = 1, 2, 4 or 8): one warp takes
// a row at a time with lane l holding classes l, l + 32, ... in registers, so a row's softmax is
// two warp reductions, and a chunk's column partials are merged over warps in warp order. Wide
// (kClassesPerLane = kWide, any K): one warp per row takes each row's log-sum-exp into shared
// memory, then thread t walks the chunk's rows for classes t, t + 256, ..., reading along the
// classes (coalesced), with each class's partial in one thread.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "../sinkhorn_common.cuh"
#include "cpsl_ops/cuda_launch.cuh"
#include "cpsl_ops/sinkhorn_math.h"

namespace cpsl_ops {
namespace sinkhorn_kernels {
namespace previous {

constexpr int kWarps = cuda::kThreads / cuda::kWarp;
constexpr int kMaxClassesPerLane = 8;
constexpr int kWide = 0;  // kClassesPerLane of the wide layout, for K > kMaxClassesPerLane * 32
// Shared memory of one block: warp partials (narrow) or the chunk's row log-sum-exps (wide).
template <int kClassesPerLane, typename acc_t>
struct Scratch {
  static constexpr int kSlots = kClassesPerLane == kWide ? 1 : kClassesPerLane * cuda::kWarp;
  acc_t a[kWarps][kSlots], b[kWarps][kSlots];
  acc_t row_logsumexp[kClassesPerLane == kWide ? kRowsPerChunk : 1];
};

// ---- Narrow layout ----

// The warp's row softmax of x + potential for its lane's classes, x = (S - M)/ε with M each
// class's largest score, subtracted in score units (sinkhorn_math.h). An x that is not finite (the
// scores are finite, checked by the first pass, but a class spreads so widely that it overflows)
// raises kSpreadOverflow.
template <int kClassesPerLane, typename scalar_t, typename acc_t>
__device__ __forceinline__ void warp_row_softmax(const scalar_t* row, const acc_t* class_max, const acc_t* potential,
                                                 int64_t classes, acc_t inv_epsilon, int lane, acc_t* values,
                                                 int32_t* flags) {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  bool finite = true;
#pragma unroll
  for (int c = 0; c < kClassesPerLane; ++c) {
    const int64_t k = lane + c * cuda::kWarp;
    const acc_t x = k < classes ? (static_cast<acc_t>(row[k]) - class_max[k]) * inv_epsilon : acc_t(0);
    finite &= isfinite(x);
    values[c] = k < classes ? x + potential[k] : -std::numeric_limits<acc_t>::infinity();
    max = values[c] > max ? values[c] : max;
  }
  if (!finite) flags[kSpreadOverflow] = 1;
  max = cuda::warp_max(max);
  acc_t sum = 0;
#pragma unroll
  for (int c = 0; c < kClassesPerLane; ++c) {
    values[c] = exp(values[c] - max);
    sum += values[c];
  }
  sum = cuda::warp_sum(sum);
#pragma unroll
  for (int c = 0; c < kClassesPerLane; ++c) values[c] /= sum;
}

// Per-class running log-sum-exp over the chunk's rows, in score units (its max is the chunk's
// largest score, its sum that of exp((S - max)/ε)), merged over warps in warp order.
template <int kClassesPerLane, typename scalar_t, typename acc_t>
__device__ void narrow_column_logsumexp(const SinkhornArgs<scalar_t, acc_t>& a, int64_t chunk,
                                        Scratch<kClassesPerLane, acc_t>& scratch) {
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp;
  const ChunkRows rows = chunk_rows(a, chunk);
  const scalar_t* s = a.scores + rows.problem * a.batch_stride;
  OnlineLogSumExp<acc_t> lse[kClassesPerLane];
  bool finite = true;
  for (int64_t i = rows.first + warp; i < rows.last; i += kWarps)
#pragma unroll
    for (int c = 0; c < kClassesPerLane; ++c) {
      const int64_t k = lane + c * cuda::kWarp;
      if (k < a.classes) {
        const acc_t score = static_cast<acc_t>(s[i * a.row_stride + k]);
        finite &= isfinite(score);
        lse[c].add(score, a.inv_epsilon);
      }
    }
  if (!finite) a.flags[kNonFiniteScores] = 1;
#pragma unroll
  for (int c = 0; c < kClassesPerLane; ++c) {
    scratch.a[warp][lane + c * cuda::kWarp] = lse[c].max;
    scratch.b[warp][lane + c * cuda::kWarp] = lse[c].sum;
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < a.classes; k += blockDim.x) {
    OnlineLogSumExp<acc_t> merged;
    for (int w = 0; w < kWarps; ++w) merged.merge(OnlineLogSumExp<acc_t>{scratch.a[w][k], scratch.b[w][k]}, a.inv_epsilon);
    a.partial_max[chunk * a.classes + k] = merged.max;
    a.partial_sum[chunk * a.classes + k] = merged.sum;
  }
  __syncthreads();  // the block's next chunk rewrites the shared arrays
}

// Per-class sums of the current row softmax over the chunk's rows (summed over warps in warp
// order), or, with kWriteAssignment, the softmax itself written out.
template <bool kWriteAssignment, int kClassesPerLane, typename scalar_t, typename acc_t>
__device__ void narrow_row_softmax_pass(const SinkhornArgs<scalar_t, acc_t>& a, int64_t chunk,
                                        Scratch<kClassesPerLane, acc_t>& scratch) {
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp;
  const ChunkRows rows = chunk_rows(a, chunk);
  const scalar_t* s = a.scores + rows.problem * a.batch_stride;
  scalar_t* o = a.out + rows.problem * a.samples * a.classes;
  acc_t mass[kClassesPerLane] = {}, values[kClassesPerLane];
  for (int64_t i = rows.first + warp; i < rows.last; i += kWarps) {
    warp_row_softmax<kClassesPerLane>(s + i * a.row_stride, a.class_max + rows.problem * a.classes,
                                      a.potential + rows.problem * a.classes, a.classes, a.inv_epsilon, lane, values,
                                      a.flags);
#pragma unroll
    for (int c = 0; c < kClassesPerLane; ++c) {
      const int64_t k = lane + c * cuda::kWarp;
      if constexpr (kWriteAssignment) {
        if (k < a.classes) o[i * a.classes + k] = static_cast<scalar_t>(values[c]);
      } else {
        mass[c] += values[c];
      }
    }
  }
  if constexpr (!kWriteAssignment) {
#pragma unroll
    for (int c = 0; c < kClassesPerLane; ++c) scratch.a[warp][lane + c * cuda::kWarp] = mass[c];
    __syncthreads();
    for (int64_t k = threadIdx.x; k < a.classes; k += blockDim.x) {
      acc_t total = 0;
      for (int w = 0; w < kWarps; ++w) total += scratch.a[w][k];
      a.partial_sum[chunk * a.classes + k] = total;
    }
    __syncthreads();
  }
}

// ---- Wide layout ----

template <typename scalar_t, typename acc_t>
__device__ void wide_column_logsumexp(const SinkhornArgs<scalar_t, acc_t>& a, int64_t chunk) {
  const ChunkRows rows = chunk_rows(a, chunk);
  const scalar_t* s = a.scores + rows.problem * a.batch_stride;
  bool finite = true;
  for (int64_t k = threadIdx.x; k < a.classes; k += blockDim.x) {
    OnlineLogSumExp<acc_t> lse;
    for (int64_t i = rows.first; i < rows.last; ++i) {
      const acc_t score = static_cast<acc_t>(s[i * a.row_stride + k]);
      finite &= isfinite(score);
      lse.add(score, a.inv_epsilon);
    }
    a.partial_max[chunk * a.classes + k] = lse.max;
    a.partial_sum[chunk * a.classes + k] = lse.sum;
  }
  if (!finite) a.flags[kNonFiniteScores] = 1;
}

// Each row's log-sum-exp of x + potential, one warp per row, into row_logsumexp[i - first].
template <typename scalar_t, typename acc_t>
__device__ void wide_row_logsumexp(const SinkhornArgs<scalar_t, acc_t>& a, const ChunkRows& rows,
                                   acc_t* row_logsumexp) {
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp;
  const scalar_t* s = a.scores + rows.problem * a.batch_stride;
  const acc_t* class_max = a.class_max + rows.problem * a.classes;
  const acc_t* potential = a.potential + rows.problem * a.classes;
  bool finite = true;
  for (int64_t i = rows.first + warp; i < rows.last; i += kWarps) {
    OnlineLogSumExp<acc_t> lse;
    for (int64_t k = lane; k < a.classes; k += cuda::kWarp) {
      const acc_t x = (static_cast<acc_t>(s[i * a.row_stride + k]) - class_max[k]) * a.inv_epsilon;
      finite &= isfinite(x);
      lse.add(x + potential[k]);
    }
    for (int offset = cuda::kWarp / 2; offset > 0; offset /= 2)
      lse.merge(OnlineLogSumExp<acc_t>{__shfl_xor_sync(0xffffffffu, lse.max, offset),
                                       __shfl_xor_sync(0xffffffffu, lse.sum, offset)});
    if (lane == 0) row_logsumexp[i - rows.first] = lse.value();
  }
  if (!finite) a.flags[kSpreadOverflow] = 1;
}

template <bool kWriteAssignment, typename scalar_t, typename acc_t>
__device__ void wide_row_softmax_pass(const SinkhornArgs<scalar_t, acc_t>& a, int64_t chunk,
                                      Scratch<kWide, acc_t>& scratch) {
  const ChunkRows rows = chunk_rows(a, chunk);
  wide_row_logsumexp(a, rows, scratch.row_logsumexp);
  __syncthreads();
  const scalar_t* s = a.scores + rows.problem * a.batch_stride;
  scalar_t* o = a.out + rows.problem * a.samples * a.classes;
  for (int64_t k = threadIdx.x; k < a.classes; k += blockDim.x) {
    const acc_t class_max = a.class_max[rows.problem * a.classes + k];
    const acc_t potential = a.potential[rows.problem * a.classes + k];
    acc_t mass = 0;
    for (int64_t i = rows.first; i < rows.last; ++i) {
      const acc_t x = (static_cast<acc_t>(s[i * a.row_stride + k]) - class_max) * a.inv_epsilon;
      const acc_t value = exp(x + potential - scratch.row_logsumexp[i - rows.first]);
      if constexpr (kWriteAssignment) {
        o[i * a.classes + k] = static_cast<scalar_t>(value);
      } else {
        mass += value;
      }
    }
    if constexpr (!kWriteAssignment) a.partial_sum[chunk * a.classes + k] = mass;
  }
  __syncthreads();  // the block's next chunk rewrites row_logsumexp
}

// ---- The three passes, per layout ----

template <int kClassesPerLane, typename scalar_t, typename acc_t>
__device__ void column_logsumexp_pass(const SinkhornArgs<scalar_t, acc_t>& a, int64_t chunk,
                                      Scratch<kClassesPerLane, acc_t>& scratch) {
  if constexpr (kClassesPerLane == kWide) {
    wide_column_logsumexp(a, chunk);
  } else {
    narrow_column_logsumexp(a, chunk, scratch);
  }
}

template <bool kWriteAssignment, int kClassesPerLane, typename scalar_t, typename acc_t>
__device__ void row_softmax_pass(const SinkhornArgs<scalar_t, acc_t>& a, int64_t chunk,
                                 Scratch<kClassesPerLane, acc_t>& scratch) {
  if constexpr (kClassesPerLane == kWide) {
    wide_row_softmax_pass<kWriteAssignment>(a, chunk, scratch);
  } else {
    narrow_row_softmax_pass<kWriteAssignment>(a, chunk, scratch);
  }
}

}  // namespace previous
}  // namespace sinkhorn_kernels
}  // namespace cpsl_ops
