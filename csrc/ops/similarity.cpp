// cpsl_ops::similarity — the similarity of pixel features to class prototypes, over τ: their cosine
// or their negated euclidean distance.
//
//   similarity(features, prototypes, temperature, metric="cosine") -> logits
//     features    (N, D) or channel-first (B, D, H, W); fp16, bf16, fp32 or fp64; any strides
//     prototypes  (K, D), same dtype and device as features
//     metric      "cosine" or "euclidean"
//     logits      (N, K) or (B, K, H, W), dtype of features:
//                 cosine:    logits[.., k, ..] = <f/max(|f|, 1e-12), c_k/max(|c_k|, 1e-12)> / temperature
//                 euclidean: logits[.., k, ..] = -||f - c_k||_2 / temperature (gradient 0 where f = c_k)
//   similarity_backward(grad_logits, features, prototypes, temperature, metric="cosine")
//       -> (grad_features, grad_prototypes)
//
// Neither kernel materializes normalized features: each tile of pixels is normalized in registers
// or cache while it is multiplied. Kernels: cpu/similarity_cpu.cpp, cuda/similarity_cuda.cu (+
// similarity_kernels.cuh, similarity_common.cuh; the generation before them, chosen by
// CPSL_OPS_CUDA_KERNELS=previous until a GPU has timed both: cuda/previous/).
// Math shared by both: include/cpsl_ops/similarity_math.h. Python: cpsl_ops/ops/similarity.py.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(cpsl_ops, m) {
  m.def("similarity(Tensor features, Tensor prototypes, float temperature, str metric=\"cosine\") -> Tensor");
  m.def(
      "similarity_backward(Tensor grad_logits, Tensor features, Tensor prototypes, float temperature,"
      " str metric=\"cosine\") -> (Tensor, Tensor)");
}
