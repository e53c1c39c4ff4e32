// CUDA runtime entry points that nvcc 13's host code and the project's launch code call but the
// simulator's CUDA 11 runtime lacks. Compiled against the simulator's headers and linked into the
// harness before its libcudart.
#include <cuda_runtime_api.h>

// nvcc 13's kernel stubs look a kernel up once, then launch it by handle: the handle is the stub.
extern "C" cudaError_t __cudaGetKernel(void** kernel, const void* host_function) {
  *kernel = const_cast<void*>(host_function);
  return cudaSuccess;
}

extern "C" cudaError_t __cudaLaunchKernel(void* kernel, dim3 grid, dim3 block, void** args, size_t shared,
                                          cudaStream_t stream) {
  return cudaLaunchKernel(kernel, grid, block, args, shared, stream);
}

// The simulator has no graphs: nothing is ever being captured.
extern "C" cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
