// CUDA implementation of cpsl_ops::rectify_pseudo_labels (schema: ops/rectify.cpp; kernel and
// launch: rectify_kernels.cuh). Under CUDA graph capture, bad values make every confidence NaN and
// every label ignore_index instead of raising.
#include <torch/csrc/stable/library.h>

#include <limits>

#include "cpsl_ops/cuda_utils.cuh"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/stable.h"
#include "rectify_kernels.cuh"

namespace cpsl_ops {
namespace {

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
    rectify_kernels::launch_rectify<scalar_t>(
        {data_of<const scalar_t>(p), cuda::strides_of(p), data_of<const scalar_t>(l), cuda::strides_of(l), p.size(0),
         p.size(1), p.size(2), threshold, ignore_index, data_of<int64_t>(labels), data_of<scalar_t>(confidence),
         invalid.data()},
        context.stream());
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
