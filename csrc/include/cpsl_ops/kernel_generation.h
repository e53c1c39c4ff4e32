// Which generation of CUDA kernels an op launches. The kernels redesigned for the bandwidth floor
// (issue 26) replace ones no GPU has timed against them yet; until one has, both stay built and
// CPSL_OPS_CUDA_KERNELS, read at each call, picks:
//   current (default)  the redesigned kernels
//   previous           the kernels before them
// benchmarks/gpu_suite.sh times both and prints which wins per op; then the loser goes, and so
// does this switch. Free of torch: the simulator harness (tests/gpusim/) includes it too.
#pragma once
#include <cstdlib>
#include <cstring>

#include "cpsl_ops/check.h"

namespace cpsl_ops {

enum class KernelGeneration { kCurrent, kPrevious };

inline KernelGeneration kernel_generation() {
  const char* value = std::getenv("CPSL_OPS_CUDA_KERNELS");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "current") == 0) return KernelGeneration::kCurrent;
  CPSL_CHECK(std::strcmp(value, "previous") == 0, "CPSL_OPS_CUDA_KERNELS must be current or previous, got '", value,
             "'");
  return KernelGeneration::kPrevious;
}

}  // namespace cpsl_ops
