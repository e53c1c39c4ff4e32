// Error checks and the accumulation type, free of torch: the host launch code of the CUDA kernels
// (csrc/cuda/*_kernels.cuh) includes them, and so does the simulator harness (tests/gpusim/),
// which links no torch.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace cpsl_ops {

// The accumulation type of a storage type, as ATen's opmath_type: float for the 16-bit types and
// float, double for double.
template <typename T>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccumulateType<T>::type;

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream stream;
  (stream << ... << args);
  return std::move(stream).str();
}

}  // namespace cpsl_ops

// A failed argument check is a RuntimeError in Python; a failed value check (NaN scores, labels out
// of range: the data, not the call, is wrong) throws std::invalid_argument, which PyTorch's op
// bindings turn into a ValueError, as the reference backend raises.
#define CPSL_CHECK(condition, ...) \
  do {                             \
    if (!(condition)) throw std::runtime_error(::cpsl_ops::concat(__VA_ARGS__)); \
  } while (false)
#define CPSL_CHECK_VALUE(condition, ...) \
  do {                                   \
    if (!(condition)) throw std::invalid_argument(::cpsl_ops::concat(__VA_ARGS__)); \
  } while (false)
