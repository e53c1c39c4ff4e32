// The pieces of the CUDA prototype update that both kernel generations use (kernel_generation.h):
// the call's arguments, the label access and the device flags. Kernels and launches:
// prototype_update_kernels.cuh (current) and previous/prototype_update_kernels.cuh.
#pragma once
#include <cstdint>

#include "cpsl_ops/cuda_launch.cuh"

namespace cpsl_ops {
namespace prototype_update_kernels {

// Device-side flags of one call (cuda::DeviceFlags in the op).
constexpr int kBadLabel = 0, kNonFiniteFeatures = 1, kNumFlags = 2;

// Per-pixel labels of a (B, P) view.
template <typename label_t>
struct Labels {
  const label_t* __restrict__ data;
  int64_t stride0, stride1, batch, pixels;
  __device__ int64_t operator()(int64_t b, int64_t p) const { return static_cast<int64_t>(data[b * stride0 + p * stride1]); }
};

// One call: features as a (B, D, P) view, labels as a (B, P) view, prototypes (K, D) of any
// strides; new_prototypes contiguous (K, D), counts (K).
template <typename scalar_t, typename label_t>
struct PrototypeUpdateArgs {
  const scalar_t* prototypes;
  int64_t prototype_stride0, prototype_stride1, classes, channels;
  const scalar_t* features;
  cuda::Strides3d feature_strides;
  Labels<label_t> labels;
  double momentum;
  int64_t ignore_index;
  scalar_t* new_prototypes;
  int64_t* counts;
  int32_t* flags;  // kNumFlags, zero on entry
};

}  // namespace prototype_update_kernels
}  // namespace cpsl_ops
