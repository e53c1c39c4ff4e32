// CUDA kernels of cpsl_ops::update_prototypes and their torch-free launch (math:
// prototype_update_math.h; the op: prototype_update_cuda.cu; shared pieces:
// prototype_update_common.cuh). Designed for the bandwidth floor (issue 26,
// benchmarks/results/README.md): the features are read once, coalesced in every layout, by two
// launches with working memory of O(chunks · K · D):
//
// - Class partials: the pixels are split into chunks of a fixed size, the channels into groups of
//   32, and a block takes one (chunk, channel group). Each of its warps walks its tiles of 32 pixels;
//   lane c owns channel c of the group and, in shared memory, one fp64 sum (class_sum_t) per class,
//   so a pixel's value is one add into the slot of its class, with no select over the classes and
//   no atomics. Consecutive pixels of a class are summed in a register first (segmentation labels
//   come in runs), and lane 0 counts the pixels of the run beside the sums: the class counts come
//   from the same pass. A tile is staged in shared memory, read along whichever of channels and
//   pixels is contiguous: lanes along channels for flat (N, D) and channels-last features, along
//   pixels for channel-first ones. The block merges its warps in warp order into its partial.
// - Merge and EMA: one thread per (class, channel) sums the chunks' partials in chunk order,
//   flags a non-finite class sum, and writes the new prototype.
//
// Every sum has one order, fixed by the problem's shape alone, so results are bit-identical from
// run to run and depend on no grid size, device, TF32 or deterministic setting. The previous
// generation stays selectable (kernel_generation.h): previous/prototype_update_kernels.cuh.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "cpsl_ops/cuda_launch.cuh"
#include "cpsl_ops/kernel_generation.h"
#include "cpsl_ops/prototype_update_math.h"
#include "previous/prototype_update_kernels.cuh"
#include "prototype_update_common.cuh"

namespace cpsl_ops {
namespace prototype_update_kernels {

constexpr int kWarps = 4;
constexpr int kBlockThreads = kWarps * cuda::kWarp;
constexpr int kTilePixels = cuda::kWarp;    // a warp's tile: lane j reads pixel j's label
constexpr int kGroupChannels = cuda::kWarp;  // a block's channels: lane c owns channel c
constexpr int kLoadBatch = 16;  // loads a lane has in flight: more need more registers than they are worth
// A chunk has at least kMinChunkPixels pixels, so that the K × 32 partial sums a block writes stay
// small beside the features it reads (2 % of them at K = 19 in fp32), and more where there would be
// over kMaxChunks partials for the merge to walk.
constexpr int64_t kMinChunkPixels = 2048;
constexpr int64_t kMaxChunks = 1024;
// Shared memory of a block, kept within the default limit that needs no opt-in: above it, the
// classes are split into groups that each read the features again (fp64 past 13 classes, fp32
// and fp16 past 29, outside CPSL's use).
constexpr int64_t kMaxSharedBytes = 48 * 1024;

inline int64_t chunk_pixels_for(int64_t total_pixels) {
  const int64_t pixels = std::max(kMinChunkPixels, cuda::blocks_for(total_pixels, kMaxChunks));
  return cuda::blocks_for(pixels, kWarps * kTilePixels) * kWarps * kTilePixels;  // tiles start sector-aligned
}

// A warp's tile in shared memory: each pixel's class slot (its class − the block's first class, or
// −1 where it adds nothing: ignored, past the end, or another class group's), the offset of its
// channel 0 (read along channels; −1 where the slot is), and values[c][j], channel c of pixel j, in
// rows of kTilePixels + 1 so that lanes walking a row or a column all hit distinct banks.
template <typename acc_t>
struct WarpTile {
  int32_t slots[kTilePixels];
  int64_t offsets[kTilePixels];
  acc_t values[kGroupChannels][kTilePixels + 1];
};

// Shared memory per class of a block: each warp's 32 sums and its count.
constexpr int64_t kSharedBytesPerClass = kWarps * (kGroupChannels * sizeof(class_sum_t) + sizeof(int32_t));

// partial_sums[chunk, k, d] and partial_counts[chunk, k] (blockIdx.y == 0 only) for chunk
// blockIdx.x, channels [32 · blockIdx.y, + 32) and classes [block_classes · blockIdx.z,
// + block_classes); raises kBadLabel on a label outside [0, K) that is not ignore_index.
// Eight blocks' worth of registers per SM (64 a thread): without that bound ptxas chose 128 for
// little gain, or 48 and spilled.
template <typename scalar_t, typename label_t, bool kAlongPixels>
__global__ void __launch_bounds__(kBlockThreads, 8)
    class_partials_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f, Labels<label_t> labels,
                          int64_t channels, int64_t classes, int64_t ignore_index, int64_t chunk_pixels,
                          int block_classes, class_sum_t* __restrict__ partial_sums,
                          int64_t* __restrict__ partial_counts, int32_t* __restrict__ flags) {
  using acc_t = acc_type<scalar_t>;
  // All dynamic (static and dynamic shared memory overlap in the simulator): the warps' tiles, then
  // their sums (kWarps, block_classes, 32), then their counts (kWarps, block_classes).
  extern __shared__ __align__(16) unsigned char block_memory[];
  WarpTile<acc_t>* const tiles = reinterpret_cast<WarpTile<acc_t>*>(block_memory);
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp;
  const int64_t k0 = static_cast<int64_t>(blockIdx.z) * block_classes;
  const int classes_here = static_cast<int>(std::min<int64_t>(block_classes, classes - k0));
  const int64_t channel0 = static_cast<int64_t>(blockIdx.y) * kGroupChannels, channel = channel0 + lane;
  const int group_channels = static_cast<int>(std::min<int64_t>(kGroupChannels, channels - channel0));
  const bool counting = blockIdx.y == 0;
  class_sum_t* const block_sums = reinterpret_cast<class_sum_t*>(tiles + kWarps);
  int32_t* const block_counts = reinterpret_cast<int32_t*>(block_sums + kWarps * block_classes * kGroupChannels);
  class_sum_t* const sums = block_sums + warp * block_classes * kGroupChannels;  // [k * 32 + lane]: the lane's
  int32_t* const counts = block_counts + warp * block_classes;                   // lane 0's
  for (int k = 0; k < classes_here; ++k) sums[k * kGroupChannels + lane] = 0;
  if (lane == 0)
    for (int k = 0; k < classes_here; ++k) counts[k] = 0;
  WarpTile<acc_t>& tile = tiles[warp];

  // The run of equal slots being summed (slot −1 sums zeros, and is dropped).
  int run_slot = -1, run_length = 0;
  class_sum_t run_sum = 0;
  const auto end_run = [&]() {
    if (run_slot >= 0) {
      sums[run_slot * kGroupChannels + lane] += run_sum;
      if (counting && lane == 0) counts[run_slot] += run_length;
    }
    run_sum = 0;
    run_length = 0;
  };

  const int64_t total = labels.batch * labels.pixels, first = blockIdx.x * chunk_pixels;
  const int64_t end = std::min(total, first + chunk_pixels);
  constexpr int kStride = kWarps * kTilePixels;  // the warps take the chunk's tiles in turn
  int64_t pixel = first + warp * kTilePixels + lane, b = pixel / labels.pixels, p = pixel % labels.pixels;
  bool bad = false;
  for (int64_t tile_first = first + warp * kTilePixels; tile_first < end; tile_first += kStride) {
    int32_t slot = -1;
    if (pixel < end) {
      const int64_t label = labels(b, p);
      if (label != ignore_index) {  // ignore_index may lie in [0, K)
        bad |= label < 0 || label >= classes;
        if (label >= k0 && label < k0 + classes_here) slot = static_cast<int32_t>(label - k0);
      }
    }
    tile.slots[lane] = slot;
    const int64_t offset = b * f.s0 + p * f.s2;
    // The tile's values (0 where the slot is −1) into tile.values[c][j], along whichever of channels
    // and pixels is contiguous.
    if constexpr (kAlongPixels) {
      const scalar_t* value = features + offset + channel0 * f.s1;  // the lane's pixel, the group's channel 0
      const int read = slot >= 0 ? group_channels : 0;
#pragma unroll 1
      for (int i0 = 0; i0 < kGroupChannels; i0 += kLoadBatch)
#pragma unroll
        for (int i = i0; i < i0 + kLoadBatch; ++i, value += f.s1)
          tile.values[i][lane] = i < read ? static_cast<acc_t>(*value) : acc_t(0);
    } else {
      tile.offsets[lane] = slot >= 0 ? offset : -1;  // torch strides are never negative
      __syncwarp();
      const scalar_t* own = features + channel * f.s1;  // the lane's channel, pixel 0 of image 0
      const bool read = lane < group_channels;
#pragma unroll 1
      for (int j0 = 0; j0 < kTilePixels; j0 += kLoadBatch)
#pragma unroll
        for (int j = j0; j < j0 + kLoadBatch; ++j) {
          const int64_t pixel_offset = tile.offsets[j];
          tile.values[lane][j] = read && pixel_offset >= 0 ? static_cast<acc_t>(own[pixel_offset]) : acc_t(0);
        }
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < kTilePixels; ++j) {
      const int32_t pixel_slot = tile.slots[j];  // the same in every lane: the branch does not diverge
      if (pixel_slot != run_slot) {
        end_run();
        run_slot = pixel_slot;
      }
      run_sum += static_cast<class_sum_t>(tile.values[lane][j]);
      ++run_length;
    }
    __syncwarp();  // the tile is read before the next one overwrites it
    pixel += kStride;
    p += kStride;
    for (; p >= labels.pixels; p -= labels.pixels) ++b;  // one compare a tile, not a 64-bit division
  }
  end_run();
  if (bad) flags[kBadLabel] = 1;

  __syncthreads();
  for (int e = threadIdx.x; e < classes_here * kGroupChannels; e += kBlockThreads) {
    const int k = e / kGroupChannels, c = e % kGroupChannels;
    class_sum_t sum = 0;
    for (int w = 0; w < kWarps; ++w) sum += block_sums[(w * block_classes + k) * kGroupChannels + c];
    if (channel0 + c < channels) partial_sums[(blockIdx.x * classes + k0 + k) * channels + channel0 + c] = sum;
  }
  if (!counting) return;
  for (int k = threadIdx.x; k < classes_here; k += kBlockThreads) {
    int64_t count = 0;
    for (int w = 0; w < kWarps; ++w) count += block_counts[w * block_classes + k];
    partial_counts[blockIdx.x * classes + k0 + k] = count;
  }
}

// new_prototypes[k, d] for class k = blockIdx.x and channel d from the chunks' partials, merged in
// chunk order; counts[k] by the block of channel 0.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(cuda::kThreads)
    merge_ema_kernel(const scalar_t* __restrict__ prototypes, int64_t stride0, int64_t stride1,
                     const class_sum_t* __restrict__ partial_sums, const int64_t* __restrict__ partial_counts,
                     int64_t chunks, int64_t classes, int64_t channels, acc_t momentum, scalar_t* __restrict__ out,
                     int64_t* __restrict__ counts, int32_t* __restrict__ flags) {
  const int64_t k = blockIdx.x, d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  int64_t count = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) count += partial_counts[chunk * classes + k];
  if (d == 0) counts[k] = count;
  if (d >= channels) return;
  class_sum_t sum = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial_sums[(chunk * classes + k) * channels + d];
  if (!isfinite(sum)) flags[kNonFiniteFeatures] = 1;
  out[k * channels + d] =
      static_cast<scalar_t>(ema_class_mean(static_cast<acc_t>(prototypes[k * stride0 + d * stride1]), sum, count, momentum));
}

template <typename scalar_t, typename label_t, bool kAlongPixels>
void launch_class_partials(const PrototypeUpdateArgs<scalar_t, label_t>& a, int64_t chunk_pixels, int64_t chunks,
                           class_sum_t* partial_sums, int64_t* partial_counts, cudaStream_t stream) {
  constexpr int64_t tile_bytes = kWarps * sizeof(WarpTile<acc_type<scalar_t>>);
  const int64_t block_classes = std::min(a.classes, (kMaxSharedBytes - tile_bytes) / kSharedBytesPerClass);
  // One class group at least: with K = 0 every label but ignore_index is out of range.
  const int64_t class_groups = a.classes == 0 ? 1 : cuda::blocks_for(a.classes, block_classes);
  const int64_t channel_groups = std::max<int64_t>(1, cuda::blocks_for(a.channels, kGroupChannels));
  CPSL_CHECK(channel_groups <= cuda::kMaxGridY && class_groups <= cuda::kMaxGridY,
             "update_prototypes: the CUDA kernel takes at most ", cuda::kMaxGridY * kGroupChannels, " channels and ",
             cuda::kMaxGridY * block_classes, " classes, got ", a.channels, " and ", a.classes);
  class_partials_kernel<scalar_t, label_t, kAlongPixels>
      <<<dim3(chunks, channel_groups, class_groups), kBlockThreads, tile_bytes + block_classes * kSharedBytesPerClass,
         stream>>>(
          a.features, a.feature_strides, a.labels, a.channels, a.classes, a.ignore_index, chunk_pixels,
          static_cast<int>(block_classes), partial_sums, partial_counts, a.flags);
  CPSL_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename label_t>
void launch_update_prototypes(const PrototypeUpdateArgs<scalar_t, label_t>& a, cuda::Workspace& workspace,
                              cudaStream_t stream) {
  if (kernel_generation() == KernelGeneration::kPrevious)
    return previous::launch_update_prototypes(a, workspace, stream);
  using acc_t = acc_type<scalar_t>;
  const int64_t total_pixels = a.labels.batch * a.labels.pixels;
  const int64_t chunk_pixels = chunk_pixels_for(total_pixels), chunks = cuda::blocks_for(total_pixels, chunk_pixels);
  class_sum_t* partial_sums = workspace.take<class_sum_t>(chunks * a.classes * a.channels);
  int64_t* partial_counts = workspace.take<int64_t>(chunks * a.classes);
  if (total_pixels > 0) {
    const cuda::Strides3d& f = a.feature_strides;
    if (std::abs(f.s2) < std::abs(f.s1))
      launch_class_partials<scalar_t, label_t, true>(a, chunk_pixels, chunks, partial_sums, partial_counts, stream);
    else
      launch_class_partials<scalar_t, label_t, false>(a, chunk_pixels, chunks, partial_sums, partial_counts, stream);
  }
  if (a.classes == 0) return;
  merge_ema_kernel<scalar_t, acc_t><<<dim3(a.classes, std::max<int64_t>(1, cuda::blocks_for(a.channels))),
                                      cuda::kThreads, 0, stream>>>(
      a.prototypes, a.prototype_stride0, a.prototype_stride1, partial_sums, partial_counts, chunks, a.classes,
      a.channels, static_cast<acc_t>(a.momentum), a.new_prototypes, a.counts, a.flags);
  CPSL_KERNEL_LAUNCH_CHECK();
}

}  // namespace prototype_update_kernels
}  // namespace cpsl_ops
