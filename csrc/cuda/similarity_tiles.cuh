// The shared-memory staging of the CUDA similarity kernels (similarity_kernels.cuh): tiles of pixels
// walked through the channels a stage at a time, read by warps along whichever of channels and
// pixels is contiguous in memory, and the walk over the channels that gives each pixel's K sums of
// the metric, held in registers: its squared norm and dot products with the normalized prototypes
// (cosine), or its squared distances to the prototypes (euclidean).
#pragma once
#include <cstdint>
#include <type_traits>

#include "cpsl_ops/cuda_launch.cuh"
#include "cpsl_ops/similarity_math.h"
#include "similarity_common.cuh"

namespace cpsl_ops {
namespace similarity_kernels {

// A block's tile of pixels (forward and feature gradient), walked kStageChannels channels at a time:
// a stage of fp32 is 16 KB of shared memory and reads 64 contiguous bytes per pixel from
// channel-last features, two full sectors.
constexpr int kTilePixels = 256;
constexpr int kStageChannels = 16;
constexpr int kMaxRegisterClasses = 32;

// The register width of K classes: K rounded up to 8, 20 (CPSL's 19 Cityscapes classes, with one
// wasted) or kMaxRegisterClasses; the padding classes have zero prototypes and are never stored.
// Multiples of 4, so that a channel's prototype values load as 16-byte vectors.
template <typename Body>
void dispatch_class_width(int64_t classes, Body&& body) {
  if (classes <= 8) return body(std::integral_constant<int, 8>{});
  if (classes <= 20) return body(std::integral_constant<int, 20>{});
  body(std::integral_constant<int, kMaxRegisterClasses>{});
}

// A tile in shared memory: element (row, pixel) at data[row * row_pitch + pixel * pixel_pitch].
template <typename acc_t>
struct SharedTile {
  acc_t* data;
  int row_pitch, pixel_pitch;
  __device__ acc_t& operator()(int row, int pixel) const { return data[row * row_pitch + pixel * pixel_pitch]; }
};

// offsets[j] = b * s0 + p * s2 for the tile's pixels j < count, pixel first + j = (b, p) of a
// (B, C, P) view flattened over (B, P): the one division per pixel, and tiles that cross images.
template <int kThreads>
__device__ __forceinline__ void tile_pixel_offsets(cuda::Strides3d s, int64_t pixels, int64_t first, int count,
                                                   int64_t* offsets) {
  for (int j = threadIdx.x; j < count; j += kThreads) {
    const int64_t pixel = first + j;
    offsets[j] = (pixel / pixels) * s.s0 + (pixel % pixels) * s.s2;
  }
}

// Whether warps walk a (B, C, P) view's tiles along rows: where rows are its smaller stride
// (channel-last and flat (N, D) features, class-last gradients), else along pixels, so that both
// layouts move whole sectors.
__device__ __forceinline__ bool along_rows(cuda::Strides3d s) {
  return (s.s1 < 0 ? -s.s1 : s.s1) < (s.s2 < 0 ? -s.s2 : s.s2);
}

// body(row, j, offsets[j] + row · s1) for every element of a kRows × kPixels tile of a (B, C, P)
// view, consecutive threads on consecutive rows or pixels (along_rows). Where the threads divide the
// walked dimension or it divides them, a thread keeps one coordinate and steps the other, which
// spares each element the index arithmetic of the general walk (a third of the forward's
// instructions); the general walk serves the tile of 20 classes.
template <int kThreads, int kRows, int kPixels, typename Body>
__device__ __forceinline__ void for_each_tile_element(cuda::Strides3d s, const int64_t* offsets, const Body& body) {
  const int t = threadIdx.x;
  const bool by_rows = along_rows(s);
  if (by_rows && kThreads % kRows == 0) {
    const int row = t % kRows;
    const int64_t row_offset = row * s.s1;
    for (int j = t / kRows; j < kPixels; j += kThreads / kRows) body(row, j, offsets[j] + row_offset);
  } else if (by_rows && kRows % kThreads == 0) {
    for (int j = 0; j < kPixels; ++j)
      for (int row = t; row < kRows; row += kThreads) body(row, j, offsets[j] + row * s.s1);
  } else if (!by_rows && kThreads % kPixels == 0) {
    const int j = t % kPixels;
    int64_t offset = offsets[j] + (t / kPixels) * s.s1;
    for (int row = t / kPixels; row < kRows; row += kThreads / kPixels, offset += (kThreads / kPixels) * s.s1)
      body(row, j, offset);
  } else if (!by_rows && kPixels % kThreads == 0) {
    for (int j = t; j < kPixels; j += kThreads) {
      int64_t offset = offsets[j];
#pragma unroll 4
      for (int row = 0; row < kRows; ++row, offset += s.s1) body(row, j, offset);
    }
  } else {
    for (int e = t; e < kRows * kPixels; e += kThreads) {
      const int row = by_rows ? e % kRows : e / kPixels, j = by_rows ? e / kRows : e % kPixels;
      body(row, j, offsets[j] + row * s.s1);
    }
  }
}

// Rows [row0, row0 + kRows) and the tile's pixels j < kPixels of a (B, C, P) view into `tile`, as
// acc_t; zero past `rows` or `count` (where offsets[j] is unwritten and its value unused).
template <int kThreads, int kRows, int kPixels, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ source, const int64_t* offsets,
                                          cuda::Strides3d s, int64_t row0, int64_t rows, int count,
                                          SharedTile<acc_t> tile) {
  const scalar_t* first_row = source + row0 * s.s1;
  const int valid_rows = static_cast<int>(min(rows - row0, static_cast<int64_t>(kRows)));
  for_each_tile_element<kThreads, kRows, kPixels>(s, offsets, [&](int row, int j, int64_t offset) {
    tile(row, j) = row < valid_rows && j < count ? static_cast<acc_t>(first_row[offset]) : acc_t(0);
  });
}

// The converse of load_tile: the tile's elements inside the view, written as load_tile reads.
template <int kThreads, int kRows, int kPixels, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_tile(SharedTile<acc_t> tile, scalar_t* __restrict__ target,
                                           const int64_t* offsets, cuda::Strides3d s, int64_t row0, int64_t rows,
                                           int count) {
  scalar_t* first_row = target + row0 * s.s1;
  const int valid_rows = static_cast<int>(min(rows - row0, static_cast<int64_t>(kRows)));
  for_each_tile_element<kThreads, kRows, kPixels>(s, offsets, [&](int row, int j, int64_t offset) {
    if (row < valid_rows && j < count) first_row[offset] = static_cast<scalar_t>(tile(row, j));
  });
}

// stage[i * kClasses + k] = prototypes[k, d0 + i] (normalized for the cosine), zero past K and D:
// one channel's classes side by side.
template <int kThreads, int kClasses, typename acc_t>
__device__ __forceinline__ void load_prototype_stage(const acc_t* __restrict__ prototypes, int64_t channels,
                                                     int64_t classes, int64_t d0, acc_t* stage) {
  for (int e = threadIdx.x; e < kStageChannels * kClasses; e += kThreads) {
    const int k = e / kStageChannels, i = e % kStageChannels;  // along channels in (K, D)
    const bool inside = k < classes && d0 + i < channels;
    stage[i * kClasses + k] = inside ? prototypes[k * channels + d0 + i] : acc_t(0);
  }
}

// Shared memory of the channel walk: a stage of the features of the tile's pixels (rows of
// kTilePixels + 1, so that threads walking a column do not collide in banks), the stage's
// prototypes (aligned for vector loads) and the pixels' offsets in the features.
template <typename acc_t, int kClasses>
struct ChannelWalkMemory {
  acc_t features[kStageChannels * (kTilePixels + 1)];
  alignas(16) acc_t prototypes[kStageChannels * kClasses];
  int64_t offsets[kTilePixels];
  int any_rescaled;

  __device__ SharedTile<acc_t> tile() { return {features, kTilePixels + 1, 1}; }
};

// One walk over the channels: for the kPixels pixels of each thread (threadIdx.x + j * kThreads of
// the tile), the kClasses sums of the metric: for the cosine the dot products <f · scale, ĉ_k> and
// the squared norm; for the euclidean the squared distances Σ_d (f_d - c_kd)^2, summed from the
// differences (similarity_math.h), leaving `squared` 0. Expects memory.offsets written; ends on a
// stage still being read.
template <SimilarityMetric kMetric, int kThreads, int kPixels, int kClasses, typename scalar_t, typename acc_t>
__device__ __forceinline__ void walk_class_sums(const scalar_t* __restrict__ features, cuda::Strides3d f,
                                                const acc_t* __restrict__ prototypes, int64_t channels,
                                                int64_t classes, int count, ChannelWalkMemory<acc_t, kClasses>& memory,
                                                const acc_t (&scale)[kPixels], acc_t (&squared)[kPixels],
                                                acc_t (&sums)[kPixels][kClasses]) {
#pragma unroll
  for (int j = 0; j < kPixels; ++j) {
    squared[j] = 0;
#pragma unroll
    for (int k = 0; k < kClasses; ++k) sums[j][k] = 0;
  }
  for (int64_t d0 = 0; d0 < channels; d0 += kStageChannels) {
    __syncthreads();  // the previous stage is read (and, at the first, the offsets written)
    load_tile<kThreads, kStageChannels, kTilePixels>(features, memory.offsets, f, d0, channels, count, memory.tile());
    load_prototype_stage<kThreads, kClasses>(prototypes, channels, classes, d0, memory.prototypes);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kStageChannels; ++i)
#pragma unroll
      for (int j = 0; j < kPixels; ++j) {
        if constexpr (kMetric == SimilarityMetric::kCosine) {
          const acc_t x = memory.tile()(i, threadIdx.x + j * kThreads) * scale[j];
          squared[j] += x * x;
#pragma unroll
          for (int k = 0; k < kClasses; ++k) sums[j][k] += x * memory.prototypes[i * kClasses + k];
        } else {
          const acc_t x = memory.tile()(i, threadIdx.x + j * kThreads);
#pragma unroll
          for (int k = 0; k < kClasses; ++k) {
            const acc_t difference = x - memory.prototypes[i * kClasses + k];
            sums[j][k] += difference * difference;
          }
        }
      }
  }
}

// walk_class_sums at each pixel's scale (similarity_math.h). Cosine: 1, but where the squared norm
// overflows, overflow_scale of the pixel's features, found by its thread from global memory, after
// which the block walks again. That rare second walk reuses the first's registers; a per-pixel path
// beside it made ptxas spill. Euclidean: always 1, as a distance whose sum of squares overflows is
// infinite, like torch.linalg.vector_norm's.
template <SimilarityMetric kMetric, int kThreads, int kPixels, int kClasses, typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_class_sums(const scalar_t* __restrict__ features, cuda::Strides3d f,
                                                const acc_t* __restrict__ prototypes, int64_t channels,
                                                int64_t pixels, int64_t first, int64_t classes, int count,
                                                ChannelWalkMemory<acc_t, kClasses>& memory, acc_t (&scale)[kPixels],
                                                acc_t (&squared)[kPixels], acc_t (&sums)[kPixels][kClasses]) {
#pragma unroll
  for (int j = 0; j < kPixels; ++j) scale[j] = 1;
  walk_class_sums<kMetric, kThreads>(features, f, prototypes, channels, classes, count, memory, scale, squared, sums);
  if constexpr (kMetric == SimilarityMetric::kEuclidean) return;
  if (threadIdx.x == 0) memory.any_rescaled = 0;
  bool rescaled = false;
#pragma unroll
  for (int j = 0; j < kPixels; ++j) {
    const int local = threadIdx.x + j * kThreads;
    if (local < count && norm_overflows(squared[j])) {
      const int64_t b = (first + local) / pixels, p = (first + local) % pixels;
      scale[j] = row_overflow_scale<acc_t>([&](int64_t d) { return static_cast<acc_t>(features[f(b, d, p)]); },
                                           channels);
      rescaled |= scale[j] != acc_t(1);  // 1: an infinite entry, whose results are NaN
    }
  }
  // __syncthreads_or(rescaled), spelled out: GPGPU-Sim's bar.red.or misses warps (a probe: true in
  // thread 100 of 128 gave false), and the kernels must run there (tests/gpusim).
  __syncthreads();
  if (rescaled) memory.any_rescaled = 1;
  __syncthreads();
  if (memory.any_rescaled)
    walk_class_sums<kMetric, kThreads>(features, f, prototypes, channels, classes, count, memory, scale, squared, sums);
}
}  // namespace similarity_kernels
}  // namespace cpsl_ops
