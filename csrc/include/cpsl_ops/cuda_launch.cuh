// The torch-free half of the CUDA helpers: error checks, launch geometry, device queries, block
// and warp reductions, strided 3-d access and a source of working memory. The kernels and their
// host launch code (csrc/cuda/*_kernels.cuh) use only these, so the simulator harness
// (tests/gpusim/) runs them through the same launch code as the ops, without linking torch.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "cpsl_ops/check.h"

// A failed CUDA runtime call or kernel launch is a RuntimeError naming the call.
#define CPSL_CUDA_CHECK(expression)                                                                     \
  do {                                                                                                  \
    const cudaError_t cpsl_status = (expression);                                                       \
    CPSL_CHECK(cpsl_status == cudaSuccess, #expression, " failed: ", cudaGetErrorString(cpsl_status)); \
  } while (false)
#define CPSL_KERNEL_LAUNCH_CHECK() CPSL_CUDA_CHECK(cudaGetLastError())

namespace cpsl_ops {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxGridY = 65535;

inline int64_t blocks_for(int64_t work, int64_t per_block = kThreads) { return (work + per_block - 1) / per_block; }

inline int current_device() {
  int device = 0;
  CPSL_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

inline int device_attribute(int device, cudaDeviceAttr attribute) {
  int value = 0;
  CPSL_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

// Whether work queued on the stream is being recorded into a CUDA graph instead of running.
inline bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CPSL_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Device memory for the intermediate buffers of one op call: torch's caching allocator inside the
// ops (cuda_utils.cuh), cudaMalloc in the simulator harness. A buffer lives as long as the
// workspace; freeing it once the call's kernels are queued is safe, because both allocators
// reuse memory in stream order.
class Workspace {
 public:
  virtual ~Workspace() = default;
  template <typename T>
  T* take(int64_t count) {
    return static_cast<T*>(allocate(static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T)));
  }

 protected:
  virtual void* allocate(size_t bytes) = 0;
};

// Fills out[0, n) with value when any of the first num_flags flags is set.
template <typename T>
__global__ void fill_if_raised_kernel(const int32_t* __restrict__ flags, int num_flags, T* __restrict__ out, int64_t n,
                                      T value) {
  bool raised = false;
  for (int f = 0; f < num_flags; ++f) raised |= flags[f] != 0;
  if (!raised) return;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = value;
}

template <typename T>
void launch_fill_if_raised(const int32_t* flags, int num_flags, T* out, int64_t n, T value, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>(blocks_for(n), 1024);
  fill_if_raised_kernel<T><<<blocks, kThreads, 0, stream>>>(flags, num_flags, out, n, value);
  CPSL_KERNEL_LAUNCH_CHECK();
}

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

// Sum over a block of kThreads threads, in a fixed order (deterministic); every thread gets it.
// `scratch` holds kThreads / kWarp values; the block must not reuse it before a __syncthreads().
template <typename T>
__device__ __forceinline__ T block_sum(T value, T* scratch) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  value = warp_sum(value);
  __syncthreads();
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kThreads / kWarp; ++w) total += scratch[w];
  return total;
}

// Strides of a (B, C, P) view, passed to kernels by value.
struct Strides3d {
  int64_t s0, s1, s2;
  __host__ __device__ int64_t operator()(int64_t i, int64_t j, int64_t l) const { return i * s0 + j * s1 + l * s2; }
};

}  // namespace cuda
}  // namespace cpsl_ops
