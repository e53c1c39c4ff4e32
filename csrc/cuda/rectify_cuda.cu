// CUDA kernel of cpsl_ops::rectify_pseudo_labels (schema: ops/rectify.cpp; math: rectify_math.h).
// One thread per pixel, one pass over its K soft labels and logits (coalesced along pixels).
#include <torch/library.h>

#include "cpsl_ops/cuda_utils.cuh"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/macros.h"
#include "cpsl_ops/rectify_math.h"

namespace cpsl_ops {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void rectify_kernel(const scalar_t* __restrict__ soft, cuda::Strides3d ps,
                               const scalar_t* __restrict__ logits, cuda::Strides3d ls, int64_t classes,
                               int64_t pixels, acc_t threshold, int64_t ignore_index, int64_t* __restrict__ labels,
                               scalar_t* __restrict__ confidence, int32_t* __restrict__ invalid) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (p >= pixels) return;
  RectifyAccumulator<acc_t> acc;
  bool valid = true;
  for (int64_t k = 0; k < classes; ++k) {
    const acc_t probability = static_cast<acc_t>(soft[ps(b, k, p)]);
    const acc_t logit = static_cast<acc_t>(logits[ls(b, k, p)]);
    valid &= valid_probability(probability) && isfinite(logit);
    acc.add(probability, logit, k);
  }
  if (!valid) *invalid = 1;
  confidence[b * pixels + p] = static_cast<scalar_t>(acc.confidence());
  labels[b * pixels + p] = acc.label(threshold, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> rectify_pseudo_labels_cuda(const at::Tensor& soft, const at::Tensor& logits,
                                                              double threshold, int64_t ignore_index) {
  check_rectify_inputs(soft, logits);
  const c10::cuda::CUDAGuard guard(soft.device());
  at::Tensor labels = at::empty({soft.size(0), soft.size(2), soft.size(3)}, soft.options().dtype(at::kLong));
  at::Tensor confidence = at::empty({soft.size(0), soft.size(2), soft.size(3)}, soft.options());
  if (labels.numel() == 0) return {labels, confidence};
  const at::Tensor p = as_batch_channel_pixel(soft), l = as_batch_channel_pixel(logits);
  at::Tensor invalid = at::zeros({1}, soft.options().dtype(at::kInt));
  CPSL_DISPATCH_FLOATING_TYPES(soft.scalar_type(), "rectify_pseudo_labels_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(cuda::blocks_for(p.size(2)), p.size(0));
    rectify_kernel<scalar_t, acc_t><<<grid, cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        p.data_ptr<scalar_t>(), cuda::Strides3d(p), l.data_ptr<scalar_t>(), cuda::Strides3d(l), p.size(1), p.size(2),
        static_cast<acc_t>(threshold), ignore_index, labels.data_ptr<int64_t>(), confidence.data_ptr<scalar_t>(),
        invalid.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  TORCH_CHECK_VALUE(!cuda::flag_raised(invalid), "rectify_pseudo_labels: soft_pseudo_labels must be finite and "
                                                 "non-negative and prototype_logits finite");
  return {labels, confidence};
}

}  // namespace

TORCH_LIBRARY_IMPL(cpsl_ops, CUDA, m) { m.impl("rectify_pseudo_labels", &rectify_pseudo_labels_cuda); }

}  // namespace cpsl_ops
