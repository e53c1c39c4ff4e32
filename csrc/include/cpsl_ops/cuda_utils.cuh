// Helpers of the CUDA kernels, on PyTorch's stable ABI: the current stream and device, error
// checks, error flags that work under CUDA graph capture, launch geometry, block and warp
// reductions and strided 3-d access.
#pragma once
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
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

// Whether work queued on the stream is being recorded into a CUDA graph instead of running.
inline bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CPSL_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

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

// The error flags of one op call, set on the device by its kernels. Outside graph capture the host
// reads them once, after every kernel: the op's one synchronization, which lets it raise a
// ValueError. While the stream is captured into a CUDA graph nothing can be read back, so read()
// reports nothing and fill_if_raised() records a kernel that, at replay, overwrites the outputs
// with NaN (or another marker) when a flag is set: no bad input passes silently either way.
template <int kFlags>
class DeviceFlags {
 public:
  DeviceFlags(const Tensor& like, cudaStream_t stream)
      : flags_(zeros_on(like, {kFlags}, ScalarType::Int)), stream_(stream), capturing_(is_capturing(stream)) {}

  int32_t* data() const { return data_of<int32_t>(flags_); }
  bool capturing() const { return capturing_; }

  template <typename T>
  void fill_if_raised(const Tensor& out, T value) const {
    if (!capturing_ || out.numel() == 0) return;
    const int64_t blocks = std::min<int64_t>(blocks_for(out.numel()), 1024);
    fill_if_raised_kernel<T><<<blocks, kThreads, 0, stream_>>>(data(), kFlags, data_of<T>(out), out.numel(), value);
    CPSL_KERNEL_LAUNCH_CHECK();
  }

  struct Raised {
    int32_t values[kFlags] = {};
    bool operator[](int i) const { return values[i] != 0; }
  };
  Raised read() const {
    Raised raised;
    if (capturing_) return raised;
    CPSL_CUDA_CHECK(cudaMemcpyAsync(raised.values, data(), sizeof(raised.values), cudaMemcpyDeviceToHost, stream_));
    CPSL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return raised;
  }

 private:
  Tensor flags_;
  cudaStream_t stream_;
  bool capturing_;
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
