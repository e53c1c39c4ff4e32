// CUDA kernels of cpsl_ops::similarity and its backward, and their torch-free launches (schema and
// math: ops/similarity.cpp, similarity_math.h; the ops: similarity_cuda.cu; shared pieces:
// similarity_common.cuh; the staging through shared memory: similarity_tiles.cuh). Designed for
// the bandwidth floor (issue 26, benchmarks/results/README.md):
//
// - Blocks walk a tile of pixels through the channels in stages held in shared memory, each
//   stage read by warps along whichever of channels and pixels is contiguous in memory (load_tile):
//   coalesced for channel-first (B, D, H, W) features as for channels-last and flat (N, D) ones.
// - The prototypes of a stage (normalized for the cosine, as they are for the euclidean metric)
//   sit in shared memory, a channel's classes side by side; a pixel's K dot products or squared
//   distances (or K gradients) stay in registers, the class count rounded up to a register width
//   (dispatch_class_width). Cosine K above kMaxRegisterClasses, outside CPSL's use, runs the
//   previous kernels (previous/similarity_kernels.cuh), which take any K in class chunks. The
//   euclidean metric has no previous generation: these kernels run it under either setting, at
//   any K in chunks of kMaxRegisterClasses classes.
// - Forward: two pixels per thread, so that each prototype value read serves two pixels.
// - Backward: one thread per pixel holds its K gradients and reads grad_logits once; a first walk
//   over the channels gives its cosines and Σ_k g_k cos_k (cosine) or its distances and the
//   weights w_k of similarity_math.h (euclidean), a second its feature gradient, staged back
//   through shared memory to be written coalesced; over several class chunks the gradient is
//   carried between them in the accumulation type. The prototype gradient is a pixel-split
//   reduction: each block sums a fixed chunk of pixels into a partial (K, D) in registers, from
//   tiles of features and gradients (cosine) or weights (euclidean) in shared memory, and the
//   partials are summed in chunk order.
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
// Prototype gradient: a block of kGradThreads covers grad_channels channels of a chunk of at least
// kMinGradChunk pixels (more where there would be over kMaxGradChunks chunks, to bound the
// partials), walked kGradStagePixels at a time.
constexpr int kGradThreads = 128;
constexpr int kGradStagePixels = 16;
constexpr int64_t kMinGradChunk = 512;
constexpr int64_t kMaxGradChunks = 1024;

// Two channels per thread for the cosine; one for the euclidean metric, whose threads also hold
// each channel's K prototype values, so that fp64 at 32 classes stays within the registers.
template <SimilarityMetric kMetric>
constexpr int grad_channels_per_thread() {
  return kMetric == SimilarityMetric::kCosine ? 2 : 1;
}

template <SimilarityMetric kMetric>
constexpr int grad_channels() {
  return kGradThreads * grad_channels_per_thread<kMetric>();
}

// The prototypes (K, D) as they are, in the accumulation type: what the euclidean walks read.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(cuda::kThreads)
    cast_prototypes_kernel(const scalar_t* __restrict__ prototypes, int64_t stride0, int64_t stride1,
                           int64_t channels, int64_t count, acc_t* __restrict__ values) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e < count) values[e] = static_cast<acc_t>(prototypes[(e / channels) * stride0 + (e % channels) * stride1]);
}

template <typename scalar_t, typename acc_t>
const acc_t* cast_prototypes(const SimilarityInputs<scalar_t>& in, cuda::Workspace& workspace, cudaStream_t stream) {
  const int64_t count = in.classes * in.channels;
  acc_t* values = workspace.take<acc_t>(count);
  if (count == 0) return values;
  cast_prototypes_kernel<scalar_t, acc_t><<<cuda::blocks_for(count), cuda::kThreads, 0, stream>>>(
      in.prototypes, in.prototype_stride0, in.prototype_stride1, in.channels, count, values);
  CPSL_KERNEL_LAUNCH_CHECK();
  return values;
}

// A logit from the channel walk's sum for its class: <f̂, ĉ_k> / τ from the dot product and the
// pixel's inverse norm (cosine), -||f - c_k|| / τ from the squared distance (euclidean).
template <SimilarityMetric kMetric, typename acc_t>
__device__ __forceinline__ acc_t logit_of(acc_t class_sum, acc_t inv_norm, acc_t inv_temperature) {
  if constexpr (kMetric == SimilarityMetric::kCosine) return class_sum * inv_norm * inv_temperature;
  return -std::sqrt(class_sum) * inv_temperature;
}

// logits[b, k, p] = <f̂, ĉ_k> / τ or -||f - c_k|| / τ for a tile of kTilePixels pixels of the
// flattened (B, P) per block.
template <typename scalar_t, typename acc_t, int kClasses, SimilarityMetric kMetric>
__global__ void __launch_bounds__(kForwardThreads)
    similarity_forward_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f,
                              const acc_t* __restrict__ prototypes, scalar_t* __restrict__ logits,
                              cuda::Strides3d out, int64_t channels, int64_t pixels, int64_t total_pixels,
                              int64_t classes, acc_t inv_temperature) {
  __shared__ ChannelWalkMemory<acc_t, kClasses> memory;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTilePixels;
  const int count = static_cast<int>(min(static_cast<int64_t>(kTilePixels), total_pixels - first));
  tile_pixel_offsets<kForwardThreads>(f, pixels, first, count, memory.offsets);
  acc_t scale[kForwardPixelsPerThread], squared[kForwardPixelsPerThread], sums[kForwardPixelsPerThread][kClasses];
  tile_class_sums<kMetric, kForwardThreads>(features, f, prototypes, channels, pixels, first, classes, count, memory,
                                            scale, squared, sums);
#pragma unroll
  for (int j = 0; j < kForwardPixelsPerThread; ++j) {
    const int64_t pixel = first + threadIdx.x + j * kForwardThreads;
    if (pixel >= total_pixels) break;
    const int64_t b = pixel / pixels, p = pixel % pixels;
    const acc_t inv_norm = inverse_clamped_norm(squared[j]);
#pragma unroll
    for (int k = 0; k < kClasses; ++k)
      if (k < classes)
        logits[out(b, k, p)] = static_cast<scalar_t>(logit_of<kMetric>(sums[j][k], inv_norm, inv_temperature));
  }
}

// What the feature-gradient kernel leaves for the prototype gradient, per pixel of the flattened
// (B, P): f̂ = f · scale · inv_norm (cosine), or the weights w_k (similarity_math.h) at
// weights[k · B·P + pixel] (euclidean).
template <typename acc_t>
struct PrototypeGradTerms {
  acc_t *scale, *inv_norm, *weights;
};

// The feature gradient of the class chunks before this one (`in`, null at the first) and of those
// up to this one (`out`, null at the last, which writes grad_f instead), (D, B·P) in the
// accumulation type: the chunks' sum is cast once. The two may be the same buffer.
template <typename acc_t>
struct CarriedFeatureGrad {
  const acc_t* in;
  acc_t* out;
};

// grad_f[b, d, p] with g = grad_logits[b, :, p] / τ, one thread per pixel, kTilePixels per block;
// also the pixels' terms of the prototype gradient. Cosine: normalized_input_grad(Σ_k ĉ[k, d] g_k,
// Σ_k g_k cos_k, f̂_d, scale · inv_norm, switch). Euclidean: -Σ_k w_k (f_d - c[k, d]), plus the
// carried gradient of the earlier class chunks.
template <typename scalar_t, typename acc_t, int kClasses, SimilarityMetric kMetric>
__global__ void __launch_bounds__(kTilePixels)
    similarity_feature_grad_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f,
                                   const scalar_t* __restrict__ grad_logits, cuda::Strides3d g,
                                   const acc_t* __restrict__ prototypes, scalar_t* __restrict__ grad,
                                   cuda::Strides3d out, PrototypeGradTerms<acc_t> terms,
                                   CarriedFeatureGrad<acc_t> carried, int64_t channels, int64_t pixels,
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

  acc_t scales[1], squared[1], sums[1][kClasses];
  tile_class_sums<kMetric, kTilePixels>(features, f, prototypes, channels, pixels, first, classes, count, memory,
                                        scales, squared, sums);
  const acc_t scale = scales[0], inv_norm = inverse_clamped_norm(squared[0]), switch_on = projection_switch(squared[0]);
  acc_t grad_dot_cos = 0;
  if constexpr (kMetric == SimilarityMetric::kCosine) {
#pragma unroll
    for (int k = 0; k < kClasses; ++k) grad_dot_cos += grad_logit[k] * sums[0][k] * inv_norm;
    if (inside) {
      terms.scale[pixel] = scale;
      terms.inv_norm[pixel] = inv_norm;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kClasses; ++k) {
      grad_logit[k] = distance_grad_weight(grad_logit[k], std::sqrt(sums[0][k]));  // from here on, w_k
      if (inside && k < classes) terms.weights[k * total_pixels + pixel] = grad_logit[k];
    }
  }

  // The second walk: each thread turns its pixel's column of the stage into its gradient in place
  // (or, but at the last class chunk, into the carried gradient).
  const bool writes_grad = kMetric == SimilarityMetric::kCosine || carried.out == nullptr;
  const SharedTile<acc_t> tile = memory.tile();
  for (int64_t d0 = 0; d0 < channels; d0 += kStageChannels) {
    __syncthreads();  // the previous stage is read and written out
    load_tile<kTilePixels, kStageChannels, kTilePixels>(features, memory.offsets, f, d0, channels, count, tile);
    load_prototype_stage<kTilePixels, kClasses>(prototypes, channels, classes, d0, memory.prototypes);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kStageChannels; ++i) {
      if constexpr (kMetric == SimilarityMetric::kCosine) {
        acc_t grad_hat = 0;
#pragma unroll
        for (int k = 0; k < kClasses; ++k) grad_hat += memory.prototypes[i * kClasses + k] * grad_logit[k];
        const acc_t x = tile(i, threadIdx.x);
        tile(i, threadIdx.x) = normalized_input_grad(grad_hat, grad_dot_cos, x * scale * inv_norm, scale * inv_norm,
                                                      switch_on);
      } else {
        const acc_t x = tile(i, threadIdx.x);
        const int64_t carried_index = (d0 + i) * total_pixels + pixel;
        const bool in_view = inside && d0 + i < channels;
        acc_t gradient = carried.in != nullptr && in_view ? carried.in[carried_index] : acc_t(0);
#pragma unroll
        for (int k = 0; k < kClasses; ++k) gradient -= grad_logit[k] * (x - memory.prototypes[i * kClasses + k]);
        if (writes_grad)
          tile(i, threadIdx.x) = gradient;
        else if (in_view)
          carried.out[carried_index] = gradient;
      }
    }
    __syncthreads();
    if (writes_grad)
      store_tile<kTilePixels, kStageChannels, kTilePixels>(tile, grad, grad_offsets, out, d0, channels, count);
  }
}

// The pixels per prototype-gradient chunk: a function of the pixel count alone, so that the sums'
// order is too.
inline int64_t grad_chunk_pixels(int64_t total_pixels) {
  return std::max(kMinGradChunk, cuda::blocks_for(total_pixels, kMaxGradChunks));
}

// partials[chunk, k, d] = Σ_{pixels of the chunk} v[k] · f̂[d] (cosine: v = grad_logits) or
// v[k] · (f[d] - c[k, d]) (euclidean: v = the weights w), for chunk blockIdx.x and the block's
// channels from blockIdx.y · grad_channels: thread t sums channels t, t + kGradThreads, ... for all
// classes in registers, over stages of kGradStagePixels pixels in shared memory. `pixel_weights`
// is the (B, K, P) view of v, of type weight_t: scalar_t or acc_t.
template <typename scalar_t, typename acc_t, int kClasses, SimilarityMetric kMetric, typename weight_t>
__global__ void __launch_bounds__(kGradThreads)
    prototype_grad_partials_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f,
                                   const weight_t* __restrict__ pixel_weights, cuda::Strides3d v,
                                   PrototypeGradTerms<acc_t> terms, const acc_t* __restrict__ prototypes,
                                   int64_t channels, int64_t pixels, int64_t total_pixels, int64_t classes,
                                   int64_t chunk_pixels, acc_t* __restrict__ partials) {
  constexpr int kChannelsPerThread = grad_channels_per_thread<kMetric>(), kChannels = grad_channels<kMetric>();
  __shared__ acc_t feature_stage[kChannels * (kGradStagePixels + 1)];
  __shared__ __align__(16) acc_t weight_stage[kGradStagePixels * kClasses];
  __shared__ int64_t feature_offsets[kGradStagePixels], weight_offsets[kGradStagePixels];
  __shared__ acc_t scale[kGradStagePixels], inv_norm[kGradStagePixels];
  const SharedTile<acc_t> feature_tile{feature_stage, kGradStagePixels + 1, 1};
  const SharedTile<acc_t> weight_tile{weight_stage, 1, kClasses};  // a pixel's classes side by side
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kChannels;
  const int64_t begin = blockIdx.x * chunk_pixels, end = min(begin + chunk_pixels, total_pixels);
  acc_t sums[kChannelsPerThread][kClasses] = {};
  acc_t channel_prototypes[kChannelsPerThread][kClasses];  // euclidean: c[k, d] of the thread's channels
  if constexpr (kMetric == SimilarityMetric::kEuclidean) {
#pragma unroll
    for (int c = 0; c < kChannelsPerThread; ++c) {
      const int64_t d = d0 + threadIdx.x + c * kGradThreads;
#pragma unroll
      for (int k = 0; k < kClasses; ++k)
        channel_prototypes[c][k] = k < classes && d < channels ? prototypes[k * channels + d] : acc_t(0);
    }
  }
  for (int64_t first = begin; first < end; first += kGradStagePixels) {
    const int count = static_cast<int>(min(static_cast<int64_t>(kGradStagePixels), end - first));
    __syncthreads();  // the previous stage is read
    tile_pixel_offsets<kGradThreads>(f, pixels, first, count, feature_offsets);
    tile_pixel_offsets<kGradThreads>(v, pixels, first, count, weight_offsets);
    if constexpr (kMetric == SimilarityMetric::kCosine) {
      if (threadIdx.x < count) {
        scale[threadIdx.x] = terms.scale[first + threadIdx.x];
        inv_norm[threadIdx.x] = terms.inv_norm[first + threadIdx.x];
      }
    }
    __syncthreads();
    load_tile<kGradThreads, kChannels, kGradStagePixels>(features, feature_offsets, f, d0, channels, count,
                                                         feature_tile);
    load_tile<kGradThreads, kClasses, kGradStagePixels>(pixel_weights, weight_offsets, v, 0, classes, count,
                                                        weight_tile);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kGradStagePixels; ++j)
#pragma unroll
      for (int c = 0; c < kChannelsPerThread; ++c) {
        const acc_t x = feature_tile(threadIdx.x + c * kGradThreads, j);
        if constexpr (kMetric == SimilarityMetric::kCosine) {
          const acc_t normalized = x * scale[j] * inv_norm[j];
#pragma unroll
          for (int k = 0; k < kClasses; ++k) sums[c][k] += weight_tile(k, j) * normalized;
        } else {
#pragma unroll
          for (int k = 0; k < kClasses; ++k) sums[c][k] += weight_tile(k, j) * (x - channel_prototypes[c][k]);
        }
      }
  }
#pragma unroll
  for (int c = 0; c < kChannelsPerThread; ++c) {
    const int64_t d = d0 + threadIdx.x + c * kGradThreads;
#pragma unroll
    for (int k = 0; k < kClasses; ++k)
      if (k < classes && d < channels) partials[(blockIdx.x * classes + k) * channels + d] = sums[c][k];
  }
}

// grad[k, d] = Σ_chunks partials[chunk, k, d] · scale, for k = blockIdx.y and the cuda::kWarp
// channels of blockIdx.x: warp w sums chunks w, w + 8, ... in order, then the warps' sums are added
// in warp order. Cosine: the gradient with respect to ĉ, in acc_t, with scale 1/τ; euclidean: the
// prototype gradient itself (its weights hold the 1/τ), in scalar_t, with scale 1.
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(cuda::kThreads)
    prototype_grad_reduce_kernel(const acc_t* __restrict__ partials, int64_t chunks, int64_t channels, int64_t classes,
                                 acc_t scale, out_t* __restrict__ grad) {
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
  grad[k * channels + d] = static_cast<out_t>(total * scale);
}

// The current kernels' forward at one metric, in chunks of kMaxRegisterClasses classes (one for the
// cosine, which runs the previous kernels above it). logits: a (B, K, P) view.
template <SimilarityMetric kMetric, typename scalar_t>
void launch_current_forward(const SimilarityInputs<scalar_t>& in, scalar_t* logits, cuda::Strides3d logit_strides,
                            cuda::Workspace& workspace, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t total_pixels = in.batch * in.pixels;
  if (total_pixels * in.classes == 0) return;
  const acc_t* prototypes = kMetric == SimilarityMetric::kCosine
                                ? normalize_prototypes<scalar_t, acc_t>(in, workspace, stream).values
                                : cast_prototypes<scalar_t, acc_t>(in, workspace, stream);
  for (int64_t k0 = 0; k0 < in.classes; k0 += kMaxRegisterClasses) {
    const int64_t classes = std::min<int64_t>(kMaxRegisterClasses, in.classes - k0);
    dispatch_class_width(classes, [&](auto width) {
      similarity_forward_kernel<scalar_t, acc_t, width.value, kMetric>
          <<<cuda::blocks_for(total_pixels, kTilePixels), kForwardThreads, 0, stream>>>(
              in.features, in.feature_strides, prototypes + k0 * in.channels, logits + k0 * logit_strides.s1,
              logit_strides, in.channels, in.pixels, total_pixels, classes, static_cast<acc_t>(1.0 / in.temperature));
      CPSL_KERNEL_LAUNCH_CHECK();
    });
  }
}

// The current kernels' backward at one metric, in chunks of kMaxRegisterClasses classes (one for the
// cosine; one, empty, where K = 0, whose feature gradient is 0). Arguments: launch_similarity_backward's.
template <SimilarityMetric kMetric, typename scalar_t>
void launch_current_backward(const SimilarityInputs<scalar_t>& in, const scalar_t* grad_logits,
                             cuda::Strides3d grad_strides, scalar_t* grad_features,
                             cuda::Strides3d grad_feature_strides, scalar_t* grad_prototypes,
                             cuda::Workspace& workspace, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kCosine = kMetric == SimilarityMetric::kCosine;
  const int64_t channels = in.channels, classes = in.classes, total_pixels = in.batch * in.pixels;
  if (total_pixels * channels == 0) return;
  CPSL_CHECK(cuda::blocks_for(channels, grad_channels<kMetric>()) <= cuda::kMaxGridY,
             "similarity_backward: the CUDA kernel takes at most ", cuda::kMaxGridY * grad_channels<kMetric>(),
             " channels, got ", channels);
  const NormalizedPrototypes<acc_t> normalized =
      kCosine ? normalize_prototypes<scalar_t, acc_t>(in, workspace, stream) : NormalizedPrototypes<acc_t>{};
  const acc_t* prototypes = kCosine ? normalized.values : cast_prototypes<scalar_t, acc_t>(in, workspace, stream);
  const PrototypeGradTerms<acc_t> terms =
      kCosine ? PrototypeGradTerms<acc_t>{workspace.take<acc_t>(total_pixels), workspace.take<acc_t>(total_pixels),
                                          nullptr}
              : PrototypeGradTerms<acc_t>{nullptr, nullptr, workspace.take<acc_t>(classes * total_pixels)};
  const int64_t class_chunks = std::max<int64_t>(1, cuda::blocks_for(classes, kMaxRegisterClasses));
  acc_t* carried = class_chunks > 1 ? workspace.take<acc_t>(channels * total_pixels) : nullptr;
  const acc_t inv_temperature = static_cast<acc_t>(1.0 / in.temperature);
  const int64_t chunk_pixels = grad_chunk_pixels(total_pixels), chunks = cuda::blocks_for(total_pixels, chunk_pixels);
  const int64_t widest_chunk = std::min<int64_t>(classes, kMaxRegisterClasses);
  acc_t* partials = workspace.take<acc_t>(chunks * widest_chunk * channels);
  acc_t* grad_hat = kCosine ? workspace.take<acc_t>(classes * channels) : nullptr;
  // The euclidean weights w, a (B, K, P) view of terms.weights, (K, B·P).
  const cuda::Strides3d weight_strides{in.pixels, total_pixels, 1};
  for (int64_t chunk = 0; chunk < class_chunks; ++chunk) {
    const int64_t k0 = chunk * kMaxRegisterClasses;
    const int64_t chunk_classes = std::min<int64_t>(kMaxRegisterClasses, classes - k0);
    const CarriedFeatureGrad<acc_t> carry{chunk > 0 ? carried : nullptr, chunk + 1 < class_chunks ? carried : nullptr};
    PrototypeGradTerms<acc_t> chunk_terms = terms;
    if constexpr (!kCosine) chunk_terms.weights += k0 * total_pixels;
    const scalar_t* chunk_grad_logits = grad_logits + k0 * grad_strides.s1;
    const acc_t* chunk_prototypes = prototypes + k0 * channels;
    // What the prototype gradient multiplies each pixel's term by: its gradients or its weights.
    const auto pixel_weights = [&] {
      if constexpr (kCosine) return chunk_grad_logits;
      else return static_cast<const acc_t*>(chunk_terms.weights);
    }();
    dispatch_class_width(chunk_classes, [&](auto width) {
      similarity_feature_grad_kernel<scalar_t, acc_t, width.value, kMetric>
          <<<cuda::blocks_for(total_pixels, kTilePixels), kTilePixels, 0, stream>>>(
              in.features, in.feature_strides, chunk_grad_logits, grad_strides, chunk_prototypes, grad_features,
              grad_feature_strides, chunk_terms, carry, channels, in.pixels, total_pixels, chunk_classes,
              inv_temperature);
      CPSL_KERNEL_LAUNCH_CHECK();
      if (chunk_classes == 0) return;
      prototype_grad_partials_kernel<scalar_t, acc_t, width.value, kMetric>
          <<<dim3(chunks, cuda::blocks_for(channels, grad_channels<kMetric>())), kGradThreads, 0, stream>>>(
              in.features, in.feature_strides, pixel_weights, kCosine ? grad_strides : weight_strides, chunk_terms,
              chunk_prototypes, channels, in.pixels, total_pixels, chunk_classes, chunk_pixels, partials);
      CPSL_KERNEL_LAUNCH_CHECK();
      const dim3 reduce_grid(cuda::blocks_for(channels, cuda::kWarp), chunk_classes);
      if constexpr (kCosine) {
        prototype_grad_reduce_kernel<acc_t, acc_t><<<reduce_grid, cuda::kThreads, 0, stream>>>(
            partials, chunks, channels, chunk_classes, inv_temperature, grad_hat);
        CPSL_KERNEL_LAUNCH_CHECK();
        prototype_normalization_grad_kernel<scalar_t, acc_t><<<classes, cuda::kThreads, 0, stream>>>(
            grad_hat, normalized.values, normalized.derivative_scale, normalized.switch_on, channels, grad_prototypes);
      } else {
        prototype_grad_reduce_kernel<acc_t, scalar_t><<<reduce_grid, cuda::kThreads, 0, stream>>>(
            partials, chunks, channels, chunk_classes, acc_t(1), grad_prototypes + k0 * channels);
      }
      CPSL_KERNEL_LAUNCH_CHECK();
    });
  }
}

// logits: a (B, K, P) view. The euclidean metric has one generation: these kernels, at any K, also
// under CPSL_OPS_CUDA_KERNELS=previous.
template <typename scalar_t>
void launch_similarity_forward(const SimilarityInputs<scalar_t>& in, scalar_t* logits, cuda::Strides3d logit_strides,
                               cuda::Workspace& workspace, cudaStream_t stream) {
  if (in.metric == SimilarityMetric::kEuclidean)
    return launch_current_forward<SimilarityMetric::kEuclidean>(in, logits, logit_strides, workspace, stream);
  if (kernel_generation() == KernelGeneration::kPrevious || in.classes > kMaxRegisterClasses)
    return previous::launch_similarity_forward(in, logits, logit_strides, workspace, stream);
  launch_current_forward<SimilarityMetric::kCosine>(in, logits, logit_strides, workspace, stream);
}

// grad_logits and grad_features: (B, K, P) and (B, D, P) views; grad_prototypes contiguous (K, D),
// written only where there are features and classes (the caller zero-fills it). The euclidean
// metric runs these kernels in either generation, as the forward does.
template <typename scalar_t>
void launch_similarity_backward(const SimilarityInputs<scalar_t>& in, const scalar_t* grad_logits,
                                cuda::Strides3d grad_strides, scalar_t* grad_features,
                                cuda::Strides3d grad_feature_strides, scalar_t* grad_prototypes,
                                cuda::Workspace& workspace, cudaStream_t stream) {
  if (in.metric == SimilarityMetric::kEuclidean)
    return launch_current_backward<SimilarityMetric::kEuclidean>(in, grad_logits, grad_strides, grad_features,
                                                                 grad_feature_strides, grad_prototypes, workspace,
                                                                 stream);
  if (kernel_generation() == KernelGeneration::kPrevious || in.classes > kMaxRegisterClasses)
    return previous::launch_similarity_backward(in, grad_logits, grad_strides, grad_features, grad_feature_strides,
                                                grad_prototypes, workspace, stream);
  launch_current_backward<SimilarityMetric::kCosine>(in, grad_logits, grad_strides, grad_features,
                                                     grad_feature_strides, grad_prototypes, workspace, stream);
}

}  // namespace similarity_kernels
}  // namespace cpsl_ops
