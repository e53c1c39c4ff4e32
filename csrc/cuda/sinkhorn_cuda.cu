// CUDA implementation of cpsl_ops::balanced_sinkhorn (schema: ops/sinkhorn.cpp; kernels and their
// two generations: sinkhorn_kernels.cuh; launch paths and their environment variables:
// sinkhorn_common.cuh). Under CUDA graph capture, bad scores or a bad prior make the assignment
// NaN instead of raising.
#include <torch/csrc/stable/library.h>

#include <limits>

#include "cpsl_ops/cuda_utils.cuh"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/sinkhorn_math.h"
#include "cpsl_ops/stable.h"
#include "sinkhorn_kernels.cuh"

namespace cpsl_ops {
namespace {

using namespace sinkhorn_kernels;

Tensor balanced_sinkhorn_cuda(const Tensor& scores, const Tensor& class_prior, double epsilon, int64_t num_iters) {
  check_sinkhorn_inputs(scores, class_prior, epsilon, num_iters);
  const int64_t batch = scores.size(0), samples = scores.size(1), classes = scores.size(2);
  const cuda::DeviceContext context(scores);
  const Tensor rows = scores.stride(2) == 1 ? scores : torch::stable::contiguous(scores);
  const Tensor assignment = empty_on(scores, {batch, samples, classes}, scores.scalar_type());
  if (batch * classes == 0) return assignment;
  const cuda::DeviceFlags<kNumFlags> flags(scores, context.stream());
  const LaunchOptions options = launch_options_from_environment(flags.capturing());
  cuda::TensorWorkspace workspace(scores);
  dispatch_floating(scores.scalar_type(), "balanced_sinkhorn", [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_floating(class_prior.scalar_type(), "balanced_sinkhorn", [&](auto prior_tag) {
      using prior_t = decltype(prior_tag);
      launch_balanced_sinkhorn<scalar_t, prior_t>(
          {data_of<const scalar_t>(rows), batch, samples, classes, rows.stride(0), rows.stride(1),
           data_of<const prior_t>(class_prior), class_prior.stride(0), class_prior.stride(1), epsilon, num_iters,
           data_of<scalar_t>(assignment), flags.data()},
          options, workspace, context.stream());
    });
    flags.fill_if_raised(assignment, static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN()));
  });
  const auto raised = flags.read();
  CPSL_CHECK_VALUE(!raised[kBadPrior], "balanced_sinkhorn: class_prior must be positive and finite in every class");
  CPSL_CHECK_VALUE(!raised[kNonFiniteScores] && !raised[kSpreadOverflow], "balanced_sinkhorn: ",
                   kNonFiniteScoresMessage);
  return assignment;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(cpsl_ops, CUDA, m) { m.impl("balanced_sinkhorn", TORCH_BOX(&balanced_sinkhorn_cuda)); }

}  // namespace cpsl_ops
