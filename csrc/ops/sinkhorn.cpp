// cpsl_ops::balanced_sinkhorn — class-balanced Sinkhorn-Knopp assignment (CPSL, SwAV with a prior).
//
//   balanced_sinkhorn(scores, class_prior, epsilon, num_iters) -> assignment
//     scores       (B, N, K): B independent problems of N samples and K classes; fp16, bf16, fp32
//                  or fp64; any strides (overlapping windows of one tensor are fine)
//     class_prior  (B, K), positive and finite, any float dtype; normalized by the kernel (in fp64)
//     epsilon      > 0, the entropic regularization
//     num_iters    >= 1 row-then-column scaling iterations
//     assignment   (B, N, K), dtype of scores, contiguous; each row sums to 1
//
// Returns exactly what the official exp-domain iteration returns, computed with the log-domain
// potentials of include/cpsl_ops/sinkhorn_math.h on x = (S - max_i S_ik)/ε (a constant added to
// one class changes nothing): num_iters + 1 passes over the matrix (on a GPU, all B problems in
// one cooperative launch, or one launch per pass), each parallel over fixed blocks of rows; the CPU kernel runs its first
// pass again, after a read-only pass for the exact class maxima, when a sample of the rows put a
// class's maximum too low. NaN or infinite scores, and a class whose x overflows, raise. No
// gradient: the targets are detached by design. Kernels: cpu/sinkhorn_cpu.cpp,
// cuda/sinkhorn_cuda.cu (kernel and launch: cuda/sinkhorn_kernels.cuh, cuda/sinkhorn_passes.cuh,
// cuda/sinkhorn_common.cuh; the generation before them, chosen by CPSL_OPS_CUDA_KERNELS=previous
// until a GPU has timed both, and K > 32: cuda/previous/).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(cpsl_ops, m) {
  m.def("balanced_sinkhorn(Tensor scores, Tensor class_prior, float epsilon, int num_iters) -> Tensor");
}
