// CUDA implementation of cpsl_ops::similarity and its backward (schema and math: ops/similarity.cpp;
// kernels and launches: similarity_kernels.cuh).
#include <torch/csrc/stable/library.h>

#include <string>

#include "cpsl_ops/cuda_utils.cuh"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/stable.h"
#include "similarity_kernels.cuh"

namespace cpsl_ops {
namespace {

template <typename scalar_t>
similarity_kernels::SimilarityInputs<scalar_t> inputs_of(const Tensor& f, const Tensor& prototypes, double temperature,
                                                         SimilarityMetric metric) {
  return {data_of<const scalar_t>(f), cuda::strides_of(f), f.size(0), f.size(1), f.size(2),
          data_of<const scalar_t>(prototypes), prototypes.stride(0), prototypes.stride(1), prototypes.size(0),
          temperature, metric};
}

Tensor similarity_cuda(const Tensor& features, const Tensor& prototypes, double temperature, std::string metric) {
  check_similarity_inputs(features, prototypes, temperature);
  const SimilarityMetric parsed_metric = similarity_metric(metric);
  const cuda::DeviceContext context(features);
  const Tensor logits = empty_on(features, logits_shape(features, prototypes.size(0)), features.scalar_type());
  if (logits.numel() == 0) return logits;
  const Tensor f = as_batch_channel_pixel(features), out = as_batch_channel_pixel(logits);
  cuda::TensorWorkspace workspace(features);
  dispatch_floating(features.scalar_type(), "similarity", [&](auto tag) {
    using scalar_t = decltype(tag);
    similarity_kernels::launch_similarity_forward<scalar_t>(
        inputs_of<scalar_t>(f, prototypes, temperature, parsed_metric), data_of<scalar_t>(out), cuda::strides_of(out),
        workspace, context.stream());
  });
  return logits;
}

std::tuple<Tensor, Tensor> similarity_backward_cuda(const Tensor& grad_logits, const Tensor& features,
                                                    const Tensor& prototypes, double temperature,
                                                    std::string metric) {
  check_similarity_backward_inputs(grad_logits, features, prototypes, temperature);
  const SimilarityMetric parsed_metric = similarity_metric(metric);
  const cuda::DeviceContext context(features);
  const Tensor grad_features = empty_on(features, features.sizes(), features.scalar_type());
  const Tensor grad_prototypes = zeros_on(prototypes, prototypes.sizes(), prototypes.scalar_type());
  if (grad_features.numel() == 0) return {grad_features, grad_prototypes};
  const Tensor grad = torch::stable::to(grad_logits, features.scalar_type());
  const Tensor f = as_batch_channel_pixel(features), g = as_batch_channel_pixel(grad);
  const Tensor grad_f = as_batch_channel_pixel(grad_features);
  cuda::TensorWorkspace workspace(features);
  dispatch_floating(features.scalar_type(), "similarity_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    similarity_kernels::launch_similarity_backward<scalar_t>(
        inputs_of<scalar_t>(f, prototypes, temperature, parsed_metric), data_of<const scalar_t>(g), cuda::strides_of(g),
        data_of<scalar_t>(grad_f), cuda::strides_of(grad_f), data_of<scalar_t>(grad_prototypes), workspace,
        context.stream());
  });
  return {grad_features, grad_prototypes};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(cpsl_ops, CUDA, m) {
  m.impl("similarity", TORCH_BOX(&similarity_cuda));
  m.impl("similarity_backward", TORCH_BOX(&similarity_backward_cuda));
}

}  // namespace cpsl_ops
