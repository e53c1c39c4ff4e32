// CUDA kernel of cpsl_ops::rectify_pseudo_labels (schema: ops/rectify.cpp; math: rectify_math.h).
// One thread per pixel, one pass over its K soft labels and logits (coalesced along pixels); the
// (image, pixel) pairs are one flat index, so the batch has no limit of 65,535. Under CUDA graph
// capture, bad values make every confidence NaN and every label ignore_index instead of raising.
#include <torch/csrc/stable/library.h>

#include <limits>

#include "cpsl_ops/cuda_utils.cuh"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/rectify_math.h"
#include "cpsl_ops/stable.h"

namespace cpsl_ops {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void rectify_kernel(const scalar_t* __restrict__ soft, cuda::Strides3d ps,
                               const scalar_t* __restrict__ logits, cuda::Strides3d ls, int64_t batch,
                               int64_t classes, int64_t pixels, acc_t threshold, int64_t ignore_index, int64_t* __restrict__ labels,
                               scalar_t* __restrict__ confidence, int32_t* __restrict__ invalid) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= batch * pixels) return;  // (b, p) flattened: no limit of 65,535 on the batch
  const int64_t b = index / pixels, p = index % pixels;
  RectifyAccumulator<acc_t> acc;
  bool valid = true;
  for (int64_t k = 0; k < classes; ++k) {
    const acc_t probability = static_cast<acc_t>(soft[ps(b, k, p)]);
    const acc_t logit = static_cast<acc_t>(logits[ls(b, k, p)]);
    valid &= valid_probability(probability) && isfinite(logit);
    acc.add(probability, logit, k);
  }
  if (!valid) *invalid = 1;
  confidence[index] = static_cast<scalar_t>(acc.confidence());
  labels[index] = acc.label(threshold, ignore_index);
}

std::tuple<Tensor, Tensor> rectify_pseudo_labels_cuda(const Tensor& soft, const Tensor& logits, double threshold,
                                                      int64_t ignore_index) {
  check_rectify_inputs(soft, logits);
  const cuda::DeviceContext context(soft);
  const Tensor labels = empty_on(soft, {soft.size(0), soft.size(2), soft.size(3)}, ScalarType::Long);
  const Tensor confidence = empty_on(soft, {soft.size(0), soft.size(2), soft.size(3)}, soft.scalar_type());
  if (labels.numel() == 0) return {labels, confidence};
  const Tensor p = as_batch_channel_pixel(soft), l = as_batch_channel_pixel(logits);
  const cuda::DeviceFlags<1> invalid(soft, context.stream());
  dispatch_floating(soft.scalar_type(), "rectify_pseudo_labels", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    rectify_kernel<scalar_t, acc_t><<<cuda::blocks_for(p.size(0) * p.size(2)), cuda::kThreads, 0, context.stream()>>>(
        data_of<const scalar_t>(p), cuda::Strides3d(p), data_of<const scalar_t>(l), cuda::Strides3d(l), p.size(0),
        p.size(1), p.size(2), static_cast<acc_t>(threshold), ignore_index, data_of<int64_t>(labels),
        data_of<scalar_t>(confidence), invalid.data());
    CPSL_KERNEL_LAUNCH_CHECK();
    invalid.fill_if_raised(confidence, static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN()));
  });
  invalid.fill_if_raised(labels, ignore_index);
  CPSL_CHECK_VALUE(!invalid.read()[0],
                   "rectify_pseudo_labels: soft_pseudo_labels must be finite and non-negative and prototype_logits "
                   "finite");
  return {labels, confidence};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(cpsl_ops, CUDA, m) {
  m.impl("rectify_pseudo_labels", TORCH_BOX(&rectify_pseudo_labels_cuda));
}

}  // namespace cpsl_ops
