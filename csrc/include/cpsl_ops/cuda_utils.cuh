// Helpers of the CUDA kernels, on PyTorch's stable ABI: the current stream and device, error
// checks, launch geometry, block and warp reductions and strided 3-d access.
#pragma once
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <cstdint>

#include "cpsl_ops/stable.h"

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

// Makes the tensor's GPU current for the kernels of one op call, and gives its current stream.
class DeviceContext {
 public:
  explicit DeviceContext(const Tensor& t) : guard_(t.get_device_index()), device_(t.get_device_index()) {
    void* stream = nullptr;
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_, &stream));
    stream_ = static_cast<cudaStream_t>(stream);
  }
  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }
  int attribute(cudaDeviceAttr attribute) const {
    int value = 0;
    CPSL_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device_));
    return value;
  }

 private:
  torch::stable::accelerator::DeviceGuard guard_;
  int device_;
  cudaStream_t stream_;
};

// Reads device-side error flags written by the kernels: the one synchronization of the eager path.
template <int kFlags>
struct HostFlags {
  int32_t values[kFlags];
  HostFlags(const Tensor& flags, cudaStream_t stream) {
    CPSL_CUDA_CHECK(cudaMemcpyAsync(values, flags.data_ptr(), sizeof(values), cudaMemcpyDeviceToHost, stream));
    CPSL_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  bool operator[](int i) const { return values[i] != 0; }
};

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
  explicit Strides3d(const Tensor& t) : s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  __host__ __device__ int64_t operator()(int64_t i, int64_t j, int64_t l) const { return i * s0 + j * s1 + l * s2; }
};

}  // namespace cuda
}  // namespace cpsl_ops
