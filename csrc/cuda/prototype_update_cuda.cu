// CUDA kernel of cpsl_ops::update_prototypes (schema: ops/prototype_update.cpp).
//
// One pass over the labels builds a (B, K, P) one-hot matrix and raises a device flag on a label
// outside [0, K) (nothing is scattered, so a bad label can never write out of bounds); one batched
// GEMM against the features gives the class sums in a single read of the features. cuBLAS GEMMs
// and ATen reductions are deterministic, so no separate deterministic mode is needed.
#include <torch/library.h>

#include "cpsl_ops/cuda_utils.cuh"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/macros.h"

namespace cpsl_ops {
namespace {

template <typename label_t, typename acc_t>
__global__ void one_hot_kernel(const label_t* __restrict__ labels, int64_t stride0, int64_t stride1, int64_t pixels,
                               int64_t classes, int64_t ignore_index, int64_t total, acc_t* __restrict__ one_hot,
                               int32_t* __restrict__ bad_label) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= total) return;
  const int64_t b = index / pixels, p = index % pixels;
  const int64_t label = static_cast<int64_t>(labels[b * stride0 + p * stride1]);
  if (label == ignore_index) return;
  if (label < 0 || label >= classes) {
    *bad_label = 1;
    return;
  }
  one_hot[(b * classes + label) * pixels + p] = acc_t(1);
}

std::tuple<at::Tensor, at::Tensor> update_prototypes_cuda(const at::Tensor& prototypes, const at::Tensor& features,
                                                          const at::Tensor& labels, double momentum,
                                                          int64_t ignore_index) {
  check_update_prototypes_inputs(prototypes, features, labels, momentum);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor f = as_batch_channel_pixel(features), label_view = as_batch_pixel(labels);
  const int64_t batch = f.size(0), pixels = f.size(2), classes = prototypes.size(0);
  at::Tensor new_prototypes, counts;
  CPSL_DISPATCH_FLOATING_TYPES(features.scalar_type(), "update_prototypes_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor one_hot = at::zeros({batch, classes, pixels}, features.options().dtype(acc_type));
    at::Tensor bad_label = at::zeros({1}, features.options().dtype(at::kInt));
    const int64_t total = batch * pixels;
    if (total > 0) {
      AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "update_prototypes_cuda_labels", [&] {
        one_hot_kernel<scalar_t, acc_t><<<cuda::blocks_for(total), cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            label_view.data_ptr<scalar_t>(), label_view.stride(0), label_view.stride(1), pixels, classes, ignore_index,
            total, one_hot.data_ptr<acc_t>(), bad_label.data_ptr<int32_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    TORCH_CHECK_VALUE(!cuda::flag_raised(bad_label), "update_prototypes: labels must lie in [0, ", classes,
                      ") or equal ignore_index=", ignore_index);
    const at::Tensor sums = at::matmul(one_hot, f.to(acc_type).transpose(1, 2)).sum(0);  // (K, D)
    // Summed as int64: fp32 sums of ones stop being exact past 2^24 pixels of one class.
    counts = one_hot.sum({0, 2}, false, at::kLong);  // (K,)
    const at::Tensor old = prototypes.to(acc_type);
    const at::Tensor means = sums / counts.clamp_min(1).to(acc_type).unsqueeze(1);
    const at::Tensor updated = at::where((counts > 0).unsqueeze(1), momentum * old + (1 - momentum) * means, old);
    new_prototypes = updated.to(prototypes.scalar_type());
  });
  return {new_prototypes, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(cpsl_ops, CUDA, m) { m.impl("update_prototypes", &update_prototypes_cuda); }

}  // namespace cpsl_ops
