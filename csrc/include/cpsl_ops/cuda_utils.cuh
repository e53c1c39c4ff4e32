// The torch half of the CUDA helpers, on PyTorch's stable ABI: the current device and stream of an
// op call, error flags that work under CUDA graph capture, working memory from torch's caching
// allocator and the strides of a tensor. The kernels and launch code use cuda_launch.cuh only.
#pragma once
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <cstdint>
#include <vector>

#include "cpsl_ops/cuda_launch.cuh"
#include "cpsl_ops/stable.h"

namespace cpsl_ops {
namespace cuda {

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

 private:
  torch::stable::accelerator::DeviceGuard guard_;
  int device_;
  cudaStream_t stream_;
};

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
    if (capturing_) launch_fill_if_raised<T>(data(), kFlags, data_of<T>(out), out.numel(), value, stream_);
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

// Working memory of one op call from torch's caching allocator, on `like`'s device.
class TensorWorkspace final : public Workspace {
 public:
  explicit TensorWorkspace(const Tensor& like) : like_(like) {}

 protected:
  void* allocate(size_t bytes) override {
    buffers_.push_back(empty_on(like_, {static_cast<int64_t>(bytes)}, ScalarType::Byte));
    return buffers_.back().data_ptr();
  }

 private:
  Tensor like_;
  std::vector<Tensor> buffers_;
};

inline Strides3d strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace cuda
}  // namespace cpsl_ops
