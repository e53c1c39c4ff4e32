// Argument checks of every op, shared by its CPU and CUDA kernels (host code). The Python API
// checks the same things first with friendlier messages; these guard direct torch.ops calls.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace cpsl_ops {

// The dispatcher picks one kernel from all of an op's tensors; a kernel handed a tensor of another
// device would dereference a pointer it cannot use.
inline void check_same_device(const char* op, const at::Tensor& first, const at::Tensor& second) {
  TORCH_CHECK(first.device() == second.device(), op, ": all tensors must be on one device, got ", first.device(),
              " and ", second.device());
}

// (N, K) for flat features, (B, K, H, W) for channel-first ones.
inline std::vector<int64_t> logits_shape(const at::Tensor& features, int64_t num_classes) {
  std::vector<int64_t> shape(features.sizes().begin(), features.sizes().end());
  shape[1] = num_classes;  // channels are dim 1 in both layouts
  return shape;
}

inline void check_similarity_inputs(const at::Tensor& features, const at::Tensor& prototypes, double temperature) {
  TORCH_CHECK(features.dim() == 2 || features.dim() == 4, "similarity: features must be (N, D) or (B, D, H, W)");
  TORCH_CHECK(prototypes.dim() == 2, "similarity: prototypes must be (K, D)");
  TORCH_CHECK(features.size(1) == prototypes.size(1), "similarity: features have D = ", features.size(1),
              " channels but prototypes have D = ", prototypes.size(1));
  TORCH_CHECK(features.scalar_type() == prototypes.scalar_type(), "similarity: features and prototypes differ in dtype");
  check_same_device("similarity", features, prototypes);
  TORCH_CHECK(temperature > 0, "similarity: temperature must be positive, got ", temperature);
}

inline void check_similarity_backward_inputs(const at::Tensor& grad_logits, const at::Tensor& features,
                                             const at::Tensor& prototypes, double temperature) {
  check_similarity_inputs(features, prototypes, temperature);
  TORCH_CHECK(grad_logits.sizes() == at::IntArrayRef(logits_shape(features, prototypes.size(0))),
              "similarity_backward: grad_logits has the wrong shape");
  check_same_device("similarity_backward", grad_logits, features);
}

inline void check_sinkhorn_inputs(const at::Tensor& scores, const at::Tensor& class_prior, double epsilon,
                                  int64_t num_iters) {
  TORCH_CHECK(scores.dim() == 3, "balanced_sinkhorn: scores must be (B, N, K), got ", scores.dim(), " dims");
  TORCH_CHECK(class_prior.dim() == 2 && class_prior.size(0) == scores.size(0) && class_prior.size(1) == scores.size(2),
              "balanced_sinkhorn: class_prior must be (B, K) = (", scores.size(0), ", ", scores.size(2), "), got ",
              class_prior.sizes());
  TORCH_CHECK(epsilon > 0, "balanced_sinkhorn: epsilon must be positive, got ", epsilon);
  TORCH_CHECK(num_iters >= 1, "balanced_sinkhorn: num_iters must be at least 1, got ", num_iters);
  TORCH_CHECK(at::isFloatingType(class_prior.scalar_type()), "balanced_sinkhorn: class_prior must be floating point");
  check_same_device("balanced_sinkhorn", scores, class_prior);
}

inline void check_update_prototypes_inputs(const at::Tensor& prototypes, const at::Tensor& features,
                                           const at::Tensor& labels, double momentum) {
  TORCH_CHECK(prototypes.dim() == 2, "update_prototypes: prototypes must be (K, D)");
  TORCH_CHECK(features.dim() == 2 || features.dim() == 4, "update_prototypes: features must be (N, D) or (B, D, H, W)");
  TORCH_CHECK(labels.dim() == features.dim() - 1, "update_prototypes: labels must be (N,) or (B, H, W)");
  TORCH_CHECK(features.size(1) == prototypes.size(1), "update_prototypes: features and prototypes differ in D");
  TORCH_CHECK(features.scalar_type() == prototypes.scalar_type(), "update_prototypes: features and prototypes differ in dtype");
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool,
              "update_prototypes: labels must have an integer dtype");
  TORCH_CHECK(momentum >= 0 && momentum <= 1, "update_prototypes: momentum must lie in [0, 1], got ", momentum);
  check_same_device("update_prototypes", prototypes, features);
  check_same_device("update_prototypes", features, labels);
}

inline void check_rectify_inputs(const at::Tensor& soft, const at::Tensor& logits) {
  TORCH_CHECK(soft.dim() == 4 && soft.sizes() == logits.sizes(),
              "rectify_pseudo_labels: soft_pseudo_labels and prototype_logits must both be (B, K, H, W)");
  TORCH_CHECK(soft.scalar_type() == logits.scalar_type(), "rectify_pseudo_labels: inputs differ in dtype");
  check_same_device("rectify_pseudo_labels", soft, logits);
}

}  // namespace cpsl_ops
