// CUDA kernels of cpsl_ops::similarity and its backward, and their torch-free launches (schema and
// math: ops/similarity.cpp, similarity_math.h; the ops: similarity_cuda.cu; shared pieces:
// similarity_common.cuh; the staging through shared memory: similarity_tiles.cuh). Designed for
// the bandwidth floor (issue 26, benchmarks/results/README.md):
//
// - Blocks walk a tile of pixels through the channels in stages held in shared memory, each
//   stage read by warps along whichever of channels and pixels is contiguous in memory (load_tile):
//   coalesced for channel-first (B, D, H, W) features as for channels-last and flat (N, D) ones.
// - The normalized prototypes of a stage sit in shared memory, a channel's classes side by side;
//   a pixel's K dot products (or K gradients) stay in registers, the class count rounded up to a
//   register width (dispatch_class_width). K above kMaxRegisterClasses, outside CPSL's use, runs
//   the previous kernels (previous/similarity_kernels.cuh), which take any K in class chunks.
// - Forward: two pixels per thread, so that each prototype value read serves two pixels.
// - Backward: one thread per pixel holds its K gradients and reads grad_logits once; a first walk
//   over the channels gives its cosines and Σ_k g_k cos_k, a second its feature gradient, staged
//   back through shared memory to be written coalesced. The prototype gradient is a pixel-split
//   reduction: each block sums a fixed chunk of pixels into a partial (K, D) in registers, from
//   tiles of features and gradients in shared memory, and the partials are summed in chunk order.
//
// No cuBLAS and no atomics: every sum has one order, fixed by the problem's shape alone, so results
// are bit-identical from run to run and do not depend on the grid, TF32 or deterministic settings.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpsl_ops/cuda_launch.cuh"
#include "cpsl_ops/kernel_generation.h"
#include "cpsl_ops/similarity_math.h"
#include "previous/similarity_kernels.cuh"
#include "similarity_common.cuh"
#include "similarity_tiles.cuh"

namespace cpsl_ops {
namespace similarity_kernels {

// The forward's threads: kForwardPixelsPerThread pixels each of a tile of kTilePixels.
constexpr int kForwardPixelsPerThread = 2;
constexpr int kForwardThreads = kTilePixels / kForwardPixelsPerThread;
// Prototype gradient: a block covers kGradChannels channels (two per thread) of a chunk of at least
// kMinGradChunk pixels (more where there would be over kMaxGradChunks chunks, to bound the
// partials), walked kGradStagePixels at a time.
constexpr int kGradThreads = 128;
constexpr int kGradChannelsPerThread = 2;
constexpr int kGradChannels = kGradThreads * kGradChannelsPerThread;
constexpr int kGradStagePixels = 16;
constexpr int64_t kMinGradChunk = 512;
constexpr int64_t kMaxGradChunks = 1024;

// logits[b, k, p] = <f̂, ĉ_k> / τ for a tile of kTilePixels pixels of the flattened (B, P) per block.
template <typename scalar_t, typename acc_t, int kClasses>
__global__ void __launch_bounds__(kForwardThreads)
    similarity_forward_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f,
                              const acc_t* __restrict__ prototypes_hat, scalar_t* __restrict__ logits,
                              cuda::Strides3d out, int64_t channels, int64_t pixels, int64_t total_pixels,
                              int64_t classes, acc_t inv_temperature) {
  __shared__ ChannelWalkMemory<acc_t, kClasses> memory;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTilePixels;
  const int count = static_cast<int>(min(static_cast<int64_t>(kTilePixels), total_pixels - first));
  tile_pixel_offsets<kForwardThreads>(f, pixels, first, count, memory.offsets);
  acc_t scale[kForwardPixelsPerThread], squared[kForwardPixelsPerThread], dots[kForwardPixelsPerThread][kClasses];
  tile_dots<kForwardThreads>(features, f, prototypes_hat, channels, pixels, first, classes, count, memory, scale,
                             squared, dots);
#pragma unroll
  for (int j = 0; j < kForwardPixelsPerThread; ++j) {
    const int64_t pixel = first + threadIdx.x + j * kForwardThreads;
    if (pixel >= total_pixels) break;
    const int64_t b = pixel / pixels, p = pixel % pixels;
    const acc_t inv_norm = inverse_clamped_norm(squared[j]);
#pragma unroll
    for (int k = 0; k < kClasses; ++k)
      if (k < classes) logits[out(b, k, p)] = static_cast<scalar_t>(dots[j][k] * inv_norm * inv_temperature);
  }
}

// Per pixel of the flattened (B, P), for the prototype gradient: f̂ = f · scale · inv_norm.
template <typename acc_t>
struct PixelNorms {
  acc_t *scale, *inv_norm;
};

// grad_f[b, d, p] = normalized_input_grad(Σ_k ĉ[k, d] g_k, Σ_k g_k cos_k, f̂_d, scale · inv_norm,
// switch) with g = grad_logits[b, :, p] / τ, one thread per pixel, kTilePixels per block; also the
// pixels' norms for the prototype gradient.
template <typename scalar_t, typename acc_t, int kClasses>
__global__ void __launch_bounds__(kTilePixels)
    similarity_feature_grad_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f,
                                   const scalar_t* __restrict__ grad_logits, cuda::Strides3d g,
                                   const acc_t* __restrict__ prototypes_hat, scalar_t* __restrict__ grad,
                                   cuda::Strides3d out, PixelNorms<acc_t> norms, int64_t channels, int64_t pixels,
                                   int64_t total_pixels, int64_t classes, acc_t inv_temperature) {
  __shared__ ChannelWalkMemory<acc_t, kClasses> memory;
  __shared__ int64_t grad_offsets[kTilePixels];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTilePixels, pixel = first + threadIdx.x;
  const int count = static_cast<int>(min(static_cast<int64_t>(kTilePixels), total_pixels - first));
  const bool inside = pixel < total_pixels;
  const int64_t b = pixel / pixels, p = pixel % pixels;
  tile_pixel_offsets<kTilePixels>(f, pixels, first, count, memory.offsets);
  tile_pixel_offsets<kTilePixels>(out, pixels, first, count, grad_offsets);
  acc_t grad_logit[kClasses];
#pragma unroll
  for (int k = 0; k < kClasses; ++k)
    grad_logit[k] = inside && k < classes ? static_cast<acc_t>(grad_logits[g(b, k, p)]) * inv_temperature : acc_t(0);

  acc_t scales[1], squared[1], dots[1][kClasses];
  tile_dots<kTilePixels>(features, f, prototypes_hat, channels, pixels, first, classes, count, memory, scales, squared,
                         dots);
  const acc_t scale = scales[0], inv_norm = inverse_clamped_norm(squared[0]), switch_on = projection_switch(squared[0]);
  acc_t grad_dot_cos = 0;
#pragma unroll
  for (int k = 0; k < kClasses; ++k) grad_dot_cos += grad_logit[k] * dots[0][k] * inv_norm;
  if (inside) {
    norms.scale[pixel] = scale;
    norms.inv_norm[pixel] = inv_norm;
  }

  // The second walk: each thread turns its pixel's column of the stage into its gradient in place.
  const SharedTile<acc_t> tile = memory.tile();
  for (int64_t d0 = 0; d0 < channels; d0 += kStageChannels) {
    __syncthreads();  // the previous stage is read and written out
    load_tile<kTilePixels, kStageChannels, kTilePixels>(features, memory.offsets, f, d0, channels, count, tile);
    load_prototype_stage<kTilePixels, kClasses>(prototypes_hat, channels, classes, d0, memory.prototypes);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kStageChannels; ++i) {
      acc_t grad_hat = 0;
#pragma unroll
      for (int k = 0; k < kClasses; ++k) grad_hat += memory.prototypes[i * kClasses + k] * grad_logit[k];
      const acc_t x = tile(i, threadIdx.x);
      tile(i, threadIdx.x) = normalized_input_grad(grad_hat, grad_dot_cos, x * scale * inv_norm, scale * inv_norm,
                                                    switch_on);
    }
    __syncthreads();
    store_tile<kTilePixels, kStageChannels, kTilePixels>(tile, grad, grad_offsets, out, d0, channels, count);
  }
}

// The pixels per prototype-gradient chunk: a function of the pixel count alone, so that the sums'
// order is too.
inline int64_t grad_chunk_pixels(int64_t total_pixels) {
  return std::max(kMinGradChunk, cuda::blocks_for(total_pixels, kMaxGradChunks));
}

// partials[chunk, k, d] = Σ_{pixels of the chunk} g[k] · f̂[d] for chunk blockIdx.x and channels
// [blockIdx.y · kGradChannels, + kGradChannels): thread t sums channels t and t + kGradThreads
// for all classes in registers, over stages of kGradStagePixels pixels in shared memory.
template <typename scalar_t, typename acc_t, int kClasses>
__global__ void __launch_bounds__(kGradThreads)
    prototype_grad_partials_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f,
                                   const scalar_t* __restrict__ grad_logits, cuda::Strides3d g,
                                   PixelNorms<acc_t> norms, int64_t channels, int64_t pixels, int64_t total_pixels,
                                   int64_t classes, int64_t chunk_pixels, acc_t* __restrict__ partials) {
  __shared__ acc_t feature_stage[kGradChannels * (kGradStagePixels + 1)];
  __shared__ __align__(16) acc_t grad_stage[kGradStagePixels * kClasses];
  __shared__ int64_t feature_offsets[kGradStagePixels], grad_offsets[kGradStagePixels];
  __shared__ acc_t scale[kGradStagePixels], inv_norm[kGradStagePixels];
  const SharedTile<acc_t> feature_tile{feature_stage, kGradStagePixels + 1, 1};
  const SharedTile<acc_t> grad_tile{grad_stage, 1, kClasses};  // a pixel's classes side by side
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kGradChannels;
  const int64_t begin = blockIdx.x * chunk_pixels, end = min(begin + chunk_pixels, total_pixels);
  acc_t sums[kGradChannelsPerThread][kClasses] = {};
  for (int64_t first = begin; first < end; first += kGradStagePixels) {
    const int count = static_cast<int>(min(static_cast<int64_t>(kGradStagePixels), end - first));
    __syncthreads();  // the previous stage is read
    tile_pixel_offsets<kGradThreads>(f, pixels, first, count, feature_offsets);
    tile_pixel_offsets<kGradThreads>(g, pixels, first, count, grad_offsets);
    if (threadIdx.x < count) {
      scale[threadIdx.x] = norms.scale[first + threadIdx.x];
      inv_norm[threadIdx.x] = norms.inv_norm[first + threadIdx.x];
    }
    __syncthreads();
    load_tile<kGradThreads, kGradChannels, kGradStagePixels>(features, feature_offsets, f, d0, channels, count,
                                                             feature_tile);
    load_tile<kGradThreads, kClasses, kGradStagePixels>(grad_logits, grad_offsets, g, 0, classes, count, grad_tile);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kGradStagePixels; ++j)
#pragma unroll
      for (int c = 0; c < kGradChannelsPerThread; ++c) {
        const acc_t normalized = feature_tile(threadIdx.x + c * kGradThreads, j) * scale[j] * inv_norm[j];
#pragma unroll
        for (int k = 0; k < kClasses; ++k) sums[c][k] += grad_tile(k, j) * normalized;
      }
  }
#pragma unroll
  for (int c = 0; c < kGradChannelsPerThread; ++c) {
    const int64_t d = d0 + threadIdx.x + c * kGradThreads;
#pragma unroll
    for (int k = 0; k < kClasses; ++k)
      if (k < classes && d < channels) partials[(blockIdx.x * classes + k) * channels + d] = sums[c][k];
  }
}

// grad_hat[k, d] = Σ_chunks partials[chunk, k, d] / τ, for k = blockIdx.y and the cuda::kWarp
// channels of blockIdx.x: warp w sums chunks w, w + 8, ... in order, then the warps' sums are added
// in warp order.
template <typename acc_t>
__global__ void __launch_bounds__(cuda::kThreads)
    prototype_grad_reduce_kernel(const acc_t* __restrict__ partials, int64_t chunks, int64_t channels, int64_t classes,
                                 acc_t inv_temperature, acc_t* __restrict__ grad_hat) {
  constexpr int kWarps = cuda::kThreads / cuda::kWarp;
  __shared__ acc_t warp_sums[kWarps][cuda::kWarp];
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp;
  const int64_t k = blockIdx.y, d = static_cast<int64_t>(blockIdx.x) * cuda::kWarp + lane;
  acc_t sum = 0;
  if (d < channels)
    for (int64_t chunk = warp; chunk < chunks; chunk += kWarps) sum += partials[(chunk * classes + k) * channels + d];
  warp_sums[warp][lane] = sum;
  __syncthreads();
  if (warp != 0 || d >= channels) return;
  acc_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += warp_sums[w][lane];
  grad_hat[k * channels + d] = total * inv_temperature;
}

// logits: a (B, K, P) view.
template <typename scalar_t>
void launch_similarity_forward(const SimilarityInputs<scalar_t>& in, scalar_t* logits, cuda::Strides3d logit_strides,
                               cuda::Workspace& workspace, cudaStream_t stream) {
  if (kernel_generation() == KernelGeneration::kPrevious || in.classes > kMaxRegisterClasses)
    return previous::launch_similarity_forward(in, logits, logit_strides, workspace, stream);
  using acc_t = acc_type<scalar_t>;
  const int64_t total_pixels = in.batch * in.pixels;
  if (total_pixels * in.classes == 0) return;
  const NormalizedPrototypes<acc_t> normalized = normalize_prototypes<scalar_t, acc_t>(in, workspace, stream);
  dispatch_class_width(in.classes, [&](auto width) {
    similarity_forward_kernel<scalar_t, acc_t, width.value>
        <<<cuda::blocks_for(total_pixels, kTilePixels), kForwardThreads, 0, stream>>>(
            in.features, in.feature_strides, normalized.values, logits, logit_strides, in.channels, in.pixels,
            total_pixels, in.classes, static_cast<acc_t>(1.0 / in.temperature));
    CPSL_KERNEL_LAUNCH_CHECK();
  });
}

// grad_logits and grad_features: (B, K, P) and (B, D, P) views; grad_prototypes contiguous (K, D),
// written only where there are features and classes (the caller zero-fills it).
template <typename scalar_t>
void launch_similarity_backward(const SimilarityInputs<scalar_t>& in, const scalar_t* grad_logits,
                                cuda::Strides3d grad_strides, scalar_t* grad_features,
                                cuda::Strides3d grad_feature_strides, scalar_t* grad_prototypes,
                                cuda::Workspace& workspace, cudaStream_t stream) {
  if (kernel_generation() == KernelGeneration::kPrevious || in.classes > kMaxRegisterClasses)
    return previous::launch_similarity_backward(in, grad_logits, grad_strides, grad_features, grad_feature_strides,
                                                grad_prototypes, workspace, stream);
  using acc_t = acc_type<scalar_t>;
  const int64_t channels = in.channels, classes = in.classes, total_pixels = in.batch * in.pixels;
  if (total_pixels * channels == 0) return;
  const NormalizedPrototypes<acc_t> normalized = normalize_prototypes<scalar_t, acc_t>(in, workspace, stream);
  const PixelNorms<acc_t> norms{workspace.take<acc_t>(total_pixels), workspace.take<acc_t>(total_pixels)};
  const acc_t inv_temperature = static_cast<acc_t>(1.0 / in.temperature);
  const int64_t chunk_pixels = grad_chunk_pixels(total_pixels), chunks = cuda::blocks_for(total_pixels, chunk_pixels);
  CPSL_CHECK(cuda::blocks_for(channels, kGradChannels) <= cuda::kMaxGridY, "similarity_backward: the CUDA kernel takes at most ",
             cuda::kMaxGridY * kGradChannels, " channels, got ", channels);
  dispatch_class_width(classes, [&](auto width) {
    similarity_feature_grad_kernel<scalar_t, acc_t, width.value>
        <<<cuda::blocks_for(total_pixels, kTilePixels), kTilePixels, 0, stream>>>(
            in.features, in.feature_strides, grad_logits, grad_strides, normalized.values, grad_features,
            grad_feature_strides, norms, channels, in.pixels, total_pixels, classes, inv_temperature);
    CPSL_KERNEL_LAUNCH_CHECK();
    if (classes == 0) return;
    acc_t* partials = workspace.take<acc_t>(chunks * classes * channels);
    prototype_grad_partials_kernel<scalar_t, acc_t, width.value>
        <<<dim3(chunks, cuda::blocks_for(channels, kGradChannels)), kGradThreads, 0, stream>>>(
            in.features, in.feature_strides, grad_logits, grad_strides, norms, channels, in.pixels, total_pixels,
            classes, chunk_pixels, partials);
    CPSL_KERNEL_LAUNCH_CHECK();
    acc_t* grad_hat = workspace.take<acc_t>(classes * channels);
    prototype_grad_reduce_kernel<acc_t><<<dim3(cuda::blocks_for(channels, cuda::kWarp), classes), cuda::kThreads, 0,
                                          stream>>>(partials, chunks, channels, classes, inv_temperature, grad_hat);
    CPSL_KERNEL_LAUNCH_CHECK();
    prototype_normalization_grad_kernel<scalar_t, acc_t><<<classes, cuda::kThreads, 0, stream>>>(
        grad_hat, normalized.values, normalized.derivative_scale, normalized.switch_on, channels, grad_prototypes);
    CPSL_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace similarity_kernels
}  // namespace cpsl_ops
