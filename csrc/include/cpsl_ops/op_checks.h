// Argument checks of every op, shared by its CPU and CUDA kernels (host code). The Python API
// checks the same things first with friendlier messages; these guard direct torch.ops calls.
#pragma once
#include <string>
#include <vector>

#include "cpsl_ops/similarity_math.h"
#include "cpsl_ops/stable.h"

namespace cpsl_ops {

// The dispatcher picks one kernel from all of an op's tensors; a kernel handed a tensor of another
// device would dereference a pointer it cannot use.
inline void check_same_device(const char* op, const Tensor& first, const Tensor& second) {
  CPSL_CHECK(first.device() == second.device(), op, ": all tensors must be on one device, got ",
             device_string(first), " and ", device_string(second));
}

// (N, K) for flat features, (B, K, H, W) for channel-first ones.
inline std::vector<int64_t> logits_shape(const Tensor& features, int64_t num_classes) {
  std::vector<int64_t> shape(features.sizes().begin(), features.sizes().end());
  shape[1] = num_classes;  // channels are dim 1 in both layouts
  return shape;
}

inline void check_similarity_inputs(const Tensor& features, const Tensor& prototypes, double temperature) {
  CPSL_CHECK(features.dim() == 2 || features.dim() == 4, "similarity: features must be (N, D) or (B, D, H, W)");
  CPSL_CHECK(prototypes.dim() == 2, "similarity: prototypes must be (K, D)");
  CPSL_CHECK(features.size(1) == prototypes.size(1), "similarity: features have D = ", features.size(1),
             " channels but prototypes have D = ", prototypes.size(1));
  CPSL_CHECK(features.scalar_type() == prototypes.scalar_type(), "similarity: features and prototypes differ in dtype");
  check_same_device("similarity", features, prototypes);
  CPSL_CHECK(temperature > 0, "similarity: temperature must be positive, got ", temperature);
}

inline void check_similarity_backward_inputs(const Tensor& grad_logits, const Tensor& features,
                                             const Tensor& prototypes, double temperature) {
  check_similarity_inputs(features, prototypes, temperature);
  const std::vector<int64_t> expected = logits_shape(features, prototypes.size(0));
  CPSL_CHECK(grad_logits.sizes() == torch::headeronly::IntHeaderOnlyArrayRef(expected),
             "similarity_backward: grad_logits has the wrong shape");
  check_same_device("similarity_backward", grad_logits, features);
}

inline void check_sinkhorn_inputs(const Tensor& scores, const Tensor& class_prior, double epsilon, int64_t num_iters) {
  CPSL_CHECK(scores.dim() == 3, "balanced_sinkhorn: scores must be (B, N, K), got ", scores.dim(), " dims");
  CPSL_CHECK(class_prior.dim() == 2 && class_prior.size(0) == scores.size(0) && class_prior.size(1) == scores.size(2),
             "balanced_sinkhorn: class_prior must be (B, K) = (", scores.size(0), ", ", scores.size(2), "), got ",
             shape_string(class_prior));
  CPSL_CHECK(epsilon > 0, "balanced_sinkhorn: epsilon must be positive, got ", epsilon);
  CPSL_CHECK(num_iters >= 1, "balanced_sinkhorn: num_iters must be at least 1, got ", num_iters);
  CPSL_CHECK(is_floating(class_prior.scalar_type()), "balanced_sinkhorn: class_prior must be floating point");
  check_same_device("balanced_sinkhorn", scores, class_prior);
}

inline void check_update_prototypes_inputs(const Tensor& prototypes, const Tensor& features, const Tensor& labels,
                                           double momentum) {
  CPSL_CHECK(prototypes.dim() == 2, "update_prototypes: prototypes must be (K, D)");
  CPSL_CHECK(features.dim() == 2 || features.dim() == 4, "update_prototypes: features must be (N, D) or (B, D, H, W)");
  CPSL_CHECK(labels.dim() == features.dim() - 1, "update_prototypes: labels must be (N,) or (B, H, W)");
  // One label per pixel: labels (N,) for features (N, D), (B, H, W) for (B, D, H, W).
  CPSL_CHECK(labels.size(0) == features.size(0) &&
                 (labels.dim() == 1 || (labels.size(1) == features.size(2) && labels.size(2) == features.size(3))),
             "update_prototypes: labels ", shape_string(labels), " do not match the pixels of features ",
             shape_string(features));
  CPSL_CHECK(features.size(1) == prototypes.size(1), "update_prototypes: features and prototypes differ in D");
  CPSL_CHECK(features.scalar_type() == prototypes.scalar_type(),
             "update_prototypes: features and prototypes differ in dtype");
  CPSL_CHECK(is_integral(labels.scalar_type()), "update_prototypes: labels must have an integer dtype");
  CPSL_CHECK(momentum >= 0 && momentum <= 1, "update_prototypes: momentum must lie in [0, 1], got ", momentum);
  check_same_device("update_prototypes", prototypes, features);
  check_same_device("update_prototypes", features, labels);
}

inline void check_rectify_inputs(const Tensor& soft, const Tensor& logits) {
  CPSL_CHECK(soft.dim() == 4 && soft.sizes() == logits.sizes(),
             "rectify_pseudo_labels: soft_pseudo_labels and prototype_logits must both be (B, K, H, W)");
  CPSL_CHECK(soft.scalar_type() == logits.scalar_type(), "rectify_pseudo_labels: inputs differ in dtype");
  check_same_device("rectify_pseudo_labels", soft, logits);
}

}  // namespace cpsl_ops
