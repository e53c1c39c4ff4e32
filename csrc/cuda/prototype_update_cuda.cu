// CUDA implementation of cpsl_ops::update_prototypes (schema: ops/prototype_update.cpp; kernels and
// launch: prototype_update_kernels.cuh). Under CUDA graph capture, a bad label or feature makes
// the new prototypes NaN instead of raising.
#include <torch/csrc/stable/library.h>

#include <limits>

#include "cpsl_ops/cuda_utils.cuh"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/stable.h"
#include "prototype_update_kernels.cuh"

namespace cpsl_ops {
namespace {

using namespace prototype_update_kernels;

std::tuple<Tensor, Tensor> update_prototypes_cuda(const Tensor& prototypes, const Tensor& features,
                                                  const Tensor& labels, double momentum, int64_t ignore_index) {
  check_update_prototypes_inputs(prototypes, features, labels, momentum);
  const cuda::DeviceContext context(features);
  const Tensor f = as_batch_channel_pixel(features), label_view = as_batch_pixel(labels);
  const int64_t classes = prototypes.size(0), channels = prototypes.size(1);
  const Tensor new_prototypes = empty_on(prototypes, {classes, channels}, prototypes.scalar_type());
  const Tensor counts = empty_on(prototypes, {classes}, ScalarType::Long);
  const cuda::DeviceFlags<kNumFlags> flags(prototypes, context.stream());
  cuda::TensorWorkspace workspace(prototypes);
  dispatch_floating(features.scalar_type(), "update_prototypes", [&](auto feature_tag) {
    using scalar_t = decltype(feature_tag);
    dispatch_integral(labels.scalar_type(), "update_prototypes", [&](auto label_tag) {
      using label_t = decltype(label_tag);
      const Labels<label_t> label_access{data_of<const label_t>(label_view), label_view.stride(0),
                                         label_view.stride(1), label_view.size(0), label_view.size(1)};
      launch_update_prototypes<scalar_t, label_t>(
          {data_of<const scalar_t>(prototypes), prototypes.stride(0), prototypes.stride(1), classes, channels,
           data_of<const scalar_t>(f), cuda::strides_of(f), label_access, momentum, ignore_index,
           data_of<scalar_t>(new_prototypes), data_of<int64_t>(counts), flags.data()},
          workspace, context.stream());
    });
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
