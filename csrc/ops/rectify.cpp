// cpsl_ops::rectify_pseudo_labels — CPSL's rectification of soft pseudo labels by the prototype
// posterior, in one pass.
//
//   rectify_pseudo_labels(soft_pseudo_labels, prototype_logits, threshold, ignore_index) -> (labels, confidence)
//     soft_pseudo_labels  (B, K, H, W) non-negative class probabilities; fp16, bf16, fp32 or fp64
//     prototype_logits    (B, K, H, W), same dtype and device
//     labels              (B, H, W) int64: argmax_k p_k·softmax(l)_k, or ignore_index where the
//                         confidence is below threshold or the soft label has no mass
//     confidence          (B, H, W), dtype of the inputs: max_k(p_k·softmax(l)_k) / sum_k(...)
//
// Math shared by CPU and CUDA: include/cpsl_ops/rectify_math.h. Kernels: cpu/rectify_cpu.cpp,
// cuda/rectify_cuda.cu (+ rectify_kernels.cuh).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(cpsl_ops, m) {
  m.def(
      "rectify_pseudo_labels(Tensor soft_pseudo_labels, Tensor prototype_logits, float threshold, int ignore_index)"
      " -> (Tensor, Tensor)");
}
