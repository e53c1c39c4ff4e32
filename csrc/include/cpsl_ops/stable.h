// The host-side vocabulary of every kernel, written against PyTorch's stable ABI only
// (torch/csrc/stable and torch/headeronly): the built library calls libtorch through its C shim and
// nothing else, so one binary loads under every torch from TORCH_TARGET_VERSION on (setup.py).
#pragma once
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "cpsl_ops/check.h"

namespace cpsl_ops {

using Tensor = torch::stable::Tensor;
using torch::headeronly::ScalarType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

template <typename T>
constexpr ScalarType scalar_type_of() {
  return torch::headeronly::CppTypeToScalarType<T>::value;
}

// "(2, 3, 4)": shapes in error messages.
inline std::string shape_string(const Tensor& t) {
  std::ostringstream stream;
  stream << "(";
  for (int64_t d = 0; d < t.dim(); ++d) stream << (d ? ", " : "") << t.size(d);
  stream << (t.dim() == 1 ? ",)" : ")");
  return std::move(stream).str();
}

inline std::string device_string(const Tensor& t) {
  return t.is_cpu() ? std::string("cpu") : concat(t.is_cuda() ? "cuda:" : "device:", t.get_device_index());
}

// Runs body(scalar_t{}) for the four floating dtypes every kernel accepts (AT_DISPATCH's role):
//   dispatch_floating(t.scalar_type(), "op", [&](auto tag) { using scalar_t = decltype(tag); ... });
template <typename Body>
void dispatch_floating(ScalarType type, const char* op, Body&& body) {
  switch (type) {
    case ScalarType::Double: return body(double{});
    case ScalarType::Float: return body(float{});
    case ScalarType::Half: return body(Half{});
    case ScalarType::BFloat16: return body(BFloat16{});
    default: throw std::runtime_error(concat(op, ": unsupported dtype ", torch::headeronly::toString(type)));
  }
}

// The same for the integer dtypes of labels.
template <typename Body>
void dispatch_integral(ScalarType type, const char* op, Body&& body) {
  switch (type) {
    case ScalarType::Byte: return body(uint8_t{});
    case ScalarType::Char: return body(int8_t{});
    case ScalarType::Short: return body(int16_t{});
    case ScalarType::Int: return body(int32_t{});
    case ScalarType::Long: return body(int64_t{});
    default: throw std::runtime_error(concat(op, ": unsupported label dtype ", torch::headeronly::toString(type)));
  }
}

inline bool is_floating(ScalarType type) {
  return type == ScalarType::Double || type == ScalarType::Float || type == ScalarType::Half ||
         type == ScalarType::BFloat16;
}

inline bool is_integral(ScalarType type) {
  return type == ScalarType::Byte || type == ScalarType::Char || type == ScalarType::Short ||
         type == ScalarType::Int || type == ScalarType::Long;
}

template <typename T>
T* data_of(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// Uninitialized and zero-filled contiguous tensors on `like`'s device.
inline Tensor empty_on(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype) {
  return torch::stable::new_empty(like, sizes, dtype);
}

inline Tensor zeros_on(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype) {
  return torch::stable::new_zeros(like, sizes, dtype);
}

}  // namespace cpsl_ops
