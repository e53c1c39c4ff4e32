// cpsl_ops::similarity — cosine similarity between pixel features and class prototypes, over τ.
//
//   similarity(features, prototypes, temperature) -> logits
//     features    (N, D) or channel-first (B, D, H, W); fp16, bf16, fp32 or fp64; any strides
//     prototypes  (K, D), same dtype and device as features
//     logits      (N, K) or (B, K, H, W), dtype of features:
//                 logits[.., k, ..] = <f/max(|f|, 1e-12), c_k/max(|c_k|, 1e-12)> / temperature
//   similarity_backward(grad_logits, features, prototypes, temperature) -> (grad_features, grad_prototypes)
//
// Neither kernel materializes normalized features: each tile of pixels is normalized in registers
// or cache while it is multiplied. Kernels: cpu/similarity_cpu.cpp, cuda/similarity_cuda.cu (+
// similarity_kernels.cuh, similarity_common.cuh; the generation before them, chosen by
// CPSL_OPS_CUDA_KERNELS=previous until a GPU has timed both: cuda/previous/).
// Math shared by both: include/cpsl_ops/similarity_math.h. Python: cpsl_ops/ops/similarity.py.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(cpsl_ops, m) {
  m.def("similarity(Tensor features, Tensor prototypes, float temperature) -> Tensor");
  m.def(
      "similarity_backward(Tensor grad_logits, Tensor features, Tensor prototypes, float temperature)"
      " -> (Tensor, Tensor)");
}
