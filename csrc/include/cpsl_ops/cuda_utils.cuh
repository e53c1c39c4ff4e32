// Helpers of the CUDA kernels: launch geometry, warp reductions and strided 3-d access.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

namespace cpsl_ops {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

inline int64_t blocks_for(int64_t work, int64_t per_block = kThreads) { return (work + per_block - 1) / per_block; }

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_max(T value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value = max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// Strides of a (B, C, P) view, passed to kernels by value.
struct Strides3d {
  int64_t s0, s1, s2;
  explicit Strides3d(const at::Tensor& t) : s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  __host__ __device__ int64_t operator()(int64_t i, int64_t j, int64_t l) const { return i * s0 + j * s1 + l * s2; }
};

// Reads a device-side error flag written by a kernel; the one synchronization of the eager path.
inline bool flag_raised(const at::Tensor& flag) { return flag.item<int32_t>() != 0; }

}  // namespace cuda
}  // namespace cpsl_ops
