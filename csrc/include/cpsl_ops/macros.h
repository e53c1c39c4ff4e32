// Qualifiers and helpers shared by the CPU (.cpp) and CUDA (.cu) translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CPSL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CPSL_HOST_DEVICE inline
#endif

// Every floating kernel accepts these four dtypes and accumulates in at::opmath_type<scalar_t>
// (float for the 16-bit types and float, double for double).
#define CPSL_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
