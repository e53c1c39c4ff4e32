// CUDA kernel of cpsl_ops::update_prototypes (schema: ops/prototype_update.cpp; math:
// prototype_update_math.h).
//
// Three launches and working memory of O(K·D): the class pixel counts (which also flag a label
// outside [0, K): nothing is ever indexed by a label, so a bad one cannot write out of bounds), the
// class sums of every channel, and the EMA step (which flags a class whose sum is not finite). A
// class sum is accumulated in double (class_sum_t) by one block per (channel, chunk of kClassChunk
// classes): each thread walks a fixed stride of the pixels with the chunk's sums in registers, and
// the block merges its threads in a fixed order. There are no atomics, so results are
// bit-identical from run to run and independent of cuBLAS settings. Under CUDA graph capture, a
// bad label or feature makes the new prototypes NaN instead of raising.
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <limits>

#include "cpsl_ops/cuda_utils.cuh"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/prototype_update_math.h"
#include "cpsl_ops/stable.h"

namespace cpsl_ops {
namespace {

constexpr int kClassChunk = 32;
// Device-side flags of one call, read by the host once, after every kernel.
constexpr int kBadLabel = 0, kNonFiniteFeatures = 1, kNumFlags = 2;

// Per-pixel labels of a (B, P) view.
template <typename label_t>
struct Labels {
  const label_t* __restrict__ data;
  int64_t stride0, stride1, batch, pixels;
  __device__ int64_t operator()(int64_t b, int64_t p) const { return static_cast<int64_t>(data[b * stride0 + p * stride1]); }
};

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

std::tuple<Tensor, Tensor> update_prototypes_cuda(const Tensor& prototypes, const Tensor& features,
                                                  const Tensor& labels, double momentum, int64_t ignore_index) {
  check_update_prototypes_inputs(prototypes, features, labels, momentum);
  const cuda::DeviceContext context(features);
  const Tensor f = as_batch_channel_pixel(features), label_view = as_batch_pixel(labels);
  const int64_t classes = prototypes.size(0), channels = prototypes.size(1);
  const int64_t class_chunks = cuda::blocks_for(classes, kClassChunk);
  CPSL_CHECK(class_chunks <= cuda::kMaxGridY, "update_prototypes: the CUDA kernel takes at most ",
             cuda::kMaxGridY * kClassChunk, " classes, got ", classes);
  const Tensor new_prototypes = empty_on(prototypes, {classes, channels}, prototypes.scalar_type());
  const Tensor counts = zeros_on(prototypes, {classes}, ScalarType::Long);
  const cuda::DeviceFlags<kNumFlags> flags(prototypes, context.stream());
  dispatch_floating(features.scalar_type(), "update_prototypes", [&](auto feature_tag) {
    using scalar_t = decltype(feature_tag);
    using acc_t = acc_type<scalar_t>;
    const Tensor sums = zeros_on(prototypes, {classes, channels}, scalar_type_of<class_sum_t>());
    dispatch_integral(labels.scalar_type(), "update_prototypes", [&](auto label_tag) {
      using label_t = decltype(label_tag);
      const Labels<label_t> label_access{data_of<const label_t>(label_view), label_view.stride(0),
                                         label_view.stride(1), label_view.size(0), label_view.size(1)};
      if (label_view.numel() == 0) return;
      // One block at least: with K = 0 every label but ignore_index is out of range.
      class_counts_kernel<label_t><<<std::max<int64_t>(class_chunks, 1), cuda::kThreads, 0, context.stream()>>>(
          label_access, classes, ignore_index, data_of<int64_t>(counts), flags.data());
      CPSL_KERNEL_LAUNCH_CHECK();
      if (channels * classes == 0) return;
      class_sums_kernel<scalar_t, label_t><<<dim3(channels, class_chunks), cuda::kThreads, 0, context.stream()>>>(
          data_of<const scalar_t>(f), cuda::Strides3d(f), label_access, channels, classes, ignore_index,
          data_of<class_sum_t>(sums));
      CPSL_KERNEL_LAUNCH_CHECK();
    });
    if (channels * classes > 0) {
      ema_kernel<scalar_t, acc_t><<<cuda::blocks_for(classes * channels), cuda::kThreads, 0, context.stream()>>>(
          data_of<const scalar_t>(prototypes), prototypes.stride(0), prototypes.stride(1),
          data_of<const class_sum_t>(sums), data_of<const int64_t>(counts), classes, channels,
          static_cast<acc_t>(momentum), data_of<scalar_t>(new_prototypes), flags.data());
      CPSL_KERNEL_LAUNCH_CHECK();
    }
    flags.fill_if_raised(new_prototypes, static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN()));
  });
  const auto raised = flags.read();
  CPSL_CHECK_VALUE(!raised[kBadLabel], "update_prototypes: labels must lie in [0, ", classes,
                   ") or equal ignore_index=", ignore_index);
  CPSL_CHECK_VALUE(!raised[kNonFiniteFeatures],
                   "update_prototypes: features must be finite at every pixel that is not ignored");
  return {new_prototypes, counts};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(cpsl_ops, CUDA, m) { m.impl("update_prototypes", TORCH_BOX(&update_prototypes_cuda)); }

}  // namespace cpsl_ops
