// The previous generation of the CUDA prototype update kernels (kernel_generation.h):
// CPSL_OPS_CUDA_KERNELS=previous. Schema and math: ops/prototype_update.cpp,
// prototype_update_math.h; shared pieces: prototype_update_common.cuh.
//
// Three launches and working memory of O(K·D): the class pixel counts (which also flag a label
// outside [0, K): nothing is ever indexed by a label, so a bad one cannot write out of bounds), the
// class sums of every channel, and the EMA step (which flags a class whose sum is not finite). A
// class sum is accumulated in double (class_sum_t) by one block per (channel, chunk of kClassChunk
// classes): each thread walks a fixed stride of the pixels with the chunk's sums in registers, and
// the block merges its threads in a fixed order. There are no atomics, so results are
// bit-identical from run to run and independent of cuBLAS settings.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpsl_ops/cuda_launch.cuh"
#include "cpsl_ops/prototype_update_math.h"
#include "../prototype_update_common.cuh"

namespace cpsl_ops {
namespace prototype_update_kernels {
namespace previous {

constexpr int kClassChunk = 32;

// counts[k] for the block's chunk of classes; raises kBadLabel on a label outside [0, K) that is
// not ignore_index.
template <typename label_t>
__global__ void __launch_bounds__(cuda::kThreads)
    class_counts_kernel(Labels<label_t> labels, int64_t classes, int64_t ignore_index, int64_t* __restrict__ counts,
                        int32_t* __restrict__ flags) {
  __shared__ int64_t scratch[cuda::kThreads / cuda::kWarp];
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kClassChunk;
  int64_t count[kClassChunk] = {};
  bool bad = false;
  for (int64_t b = 0; b < labels.batch; ++b)
    for (int64_t p = threadIdx.x; p < labels.pixels; p += blockDim.x) {
      const int64_t label = labels(b, p);
      if (label == ignore_index) continue;  // ignore_index may lie in [0, K)
      bad |= label < 0 || label >= classes;
#pragma unroll
      for (int c = 0; c < kClassChunk; ++c) count[c] += label == k0 + c;
    }
  if (bad) flags[kBadLabel] = 1;
  for (int c = 0; c < kClassChunk; ++c) {
    const int64_t total = cuda::block_sum(count[c], scratch);
    if (threadIdx.x == 0 && k0 + c < classes) counts[k0 + c] = total;
  }
}

// sums[k * D + d] = Σ over pixels labelled k of f[b, d, p], for channel d = blockIdx.x and the
// classes of chunk blockIdx.y.
template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(cuda::kThreads)
    class_sums_kernel(const scalar_t* __restrict__ features, cuda::Strides3d f, Labels<label_t> labels,
                      int64_t channels, int64_t classes, int64_t ignore_index, class_sum_t* __restrict__ sums) {
  __shared__ class_sum_t scratch[cuda::kThreads / cuda::kWarp];
  const int64_t d = blockIdx.x, k0 = static_cast<int64_t>(blockIdx.y) * kClassChunk;
  class_sum_t sum[kClassChunk] = {};
  for (int64_t b = 0; b < labels.batch; ++b)
    for (int64_t p = threadIdx.x; p < labels.pixels; p += blockDim.x) {
      const int64_t label = labels(b, p), slot = label - k0;
      if (label == ignore_index || slot < 0 || slot >= kClassChunk) continue;
      const class_sum_t value = static_cast<class_sum_t>(static_cast<acc_type<scalar_t>>(features[f(b, d, p)]));
#pragma unroll
      for (int c = 0; c < kClassChunk; ++c) sum[c] += slot == c ? value : class_sum_t(0);
    }
  for (int c = 0; c < kClassChunk; ++c) {
    const class_sum_t total = cuda::block_sum(sum[c], scratch);
    if (threadIdx.x == 0 && k0 + c < classes) sums[(k0 + c) * channels + d] = total;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void ema_kernel(const scalar_t* __restrict__ prototypes, int64_t stride0, int64_t stride1,
                           const class_sum_t* __restrict__ sums, const int64_t* __restrict__ counts, int64_t classes,
                           int64_t channels, acc_t momentum, scalar_t* __restrict__ out, int32_t* __restrict__ flags) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= classes * channels) return;
  const int64_t k = index / channels, d = index % channels;
  if (!isfinite(sums[index])) flags[kNonFiniteFeatures] = 1;
  out[index] = static_cast<scalar_t>(
      ema_class_mean(static_cast<acc_t>(prototypes[k * stride0 + d * stride1]), sums[index], counts[k], momentum));
}

template <typename scalar_t, typename label_t>
void launch_update_prototypes(const PrototypeUpdateArgs<scalar_t, label_t>& a, cuda::Workspace& workspace,
                              cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t class_chunks = cuda::blocks_for(a.classes, kClassChunk);
  CPSL_CHECK(class_chunks <= cuda::kMaxGridY, "update_prototypes: the CUDA kernel takes at most ",
             cuda::kMaxGridY * kClassChunk, " classes, got ", a.classes);
  class_sum_t* sums = workspace.take<class_sum_t>(a.classes * a.channels);
  if (a.classes > 0) {
    CPSL_CUDA_CHECK(cudaMemsetAsync(a.counts, 0, sizeof(int64_t) * a.classes, stream));
    CPSL_CUDA_CHECK(cudaMemsetAsync(sums, 0, sizeof(class_sum_t) * a.classes * a.channels, stream));
  }
  if (a.labels.batch * a.labels.pixels > 0) {
    // One block at least: with K = 0 every label but ignore_index is out of range.
    class_counts_kernel<label_t><<<std::max<int64_t>(class_chunks, 1), cuda::kThreads, 0, stream>>>(
        a.labels, a.classes, a.ignore_index, a.counts, a.flags);
    CPSL_KERNEL_LAUNCH_CHECK();
    if (a.channels * a.classes > 0) {
      class_sums_kernel<scalar_t, label_t><<<dim3(a.channels, class_chunks), cuda::kThreads, 0, stream>>>(
          a.features, a.feature_strides, a.labels, a.channels, a.classes, a.ignore_index, sums);
      CPSL_KERNEL_LAUNCH_CHECK();
    }
  }
  if (a.channels * a.classes == 0) return;
  ema_kernel<scalar_t, acc_t><<<cuda::blocks_for(a.classes * a.channels), cuda::kThreads, 0, stream>>>(
      a.prototypes, a.prototype_stride0, a.prototype_stride1, sums, a.counts, a.classes, a.channels,
      static_cast<acc_t>(a.momentum), a.new_prototypes, a.flags);
  CPSL_KERNEL_LAUNCH_CHECK();
}

}  // namespace previous
}  // namespace prototype_update_kernels
}  // namespace cpsl_ops
