// CUDA kernel of cpsl_ops::rectify_pseudo_labels and its torch-free launch (math: rectify_math.h;
// the op: rectify_cuda.cu). One thread per pixel, one pass over its K soft labels and logits
// (coalesced along pixels); the (image, pixel) pairs are one flat index, so the batch has no limit
// of 65,535.
#pragma once
#include <cstdint>

#include "cpsl_ops/cuda_launch.cuh"
#include "cpsl_ops/rectify_math.h"

namespace cpsl_ops {
namespace rectify_kernels {

// One call: soft labels and logits as (B, K, P) views; labels and confidence contiguous (B, P).
template <typename scalar_t>
struct RectifyArgs {
  const scalar_t* soft;
  cuda::Strides3d soft_strides;
  const scalar_t* logits;
  cuda::Strides3d logit_strides;
  int64_t batch, classes, pixels;
  double threshold;
  int64_t ignore_index;
  int64_t* labels;
  scalar_t* confidence;
  int32_t* invalid;  // one flag: a negative or non-finite soft label, or a non-finite logit
};

template <typename scalar_t, typename acc_t>
__global__ void rectify_kernel(RectifyArgs<scalar_t> a) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= a.batch * a.pixels) return;
  const int64_t b = index / a.pixels, p = index % a.pixels;
  RectifyAccumulator<acc_t> acc;
  bool valid = true;
  for (int64_t k = 0; k < a.classes; ++k) {
    const acc_t probability = static_cast<acc_t>(a.soft[a.soft_strides(b, k, p)]);
    const acc_t logit = static_cast<acc_t>(a.logits[a.logit_strides(b, k, p)]);
    valid &= valid_probability(probability) && isfinite(logit);
    acc.add(probability, logit, k);
  }
  if (!valid) *a.invalid = 1;
  a.confidence[index] = static_cast<scalar_t>(acc.confidence());
  a.labels[index] = acc.label(static_cast<acc_t>(a.threshold), a.ignore_index);
}

template <typename scalar_t>
void launch_rectify(const RectifyArgs<scalar_t>& args, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  if (args.batch * args.pixels == 0) return;
  rectify_kernel<scalar_t, acc_t><<<cuda::blocks_for(args.batch * args.pixels), cuda::kThreads, 0, stream>>>(args);
  CPSL_KERNEL_LAUNCH_CHECK();
}

}  // namespace rectify_kernels
}  // namespace cpsl_ops
