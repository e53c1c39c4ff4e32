// cpsl_ops::update_prototypes — ProDA-style class-wise masked means with an EMA step.
//
//   update_prototypes(prototypes, features, labels, momentum, ignore_index) -> (new_prototypes, counts)
//     prototypes      (K, D); fp16, bf16, fp32 or fp64
//     features        (N, D) or channel-first (B, D, H, W), same dtype; any strides
//     labels          (N,) or (B, H, W), any integer dtype; values in [0, K) or ignore_index
//     new_prototypes  (K, D): m·p_k + (1 − m)·mean_k for every class with a pixel, p_k otherwise
//     counts          (K,) int64 pixel counts
//
// Functional: the Python wrapper copies new_prototypes into the caller's tensor. A label outside
// [0, K) that is not ignore_index raises a ValueError naming it; nothing is written for it.
// Sums are accumulated in fixed blocks merged in order, so results are deterministic.
// Kernels: cpu/prototype_update_cpu.cpp, cuda/prototype_update_cuda.cu (+
// prototype_update_kernels.cuh, prototype_update_common.cuh; the generation before them, chosen
// by CPSL_OPS_CUDA_KERNELS=previous until a GPU has timed both: cuda/previous/).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(cpsl_ops, m) {
  m.def(
      "update_prototypes(Tensor prototypes, Tensor features, Tensor labels, float momentum, int ignore_index)"
      " -> (Tensor, Tensor)");
}
