// Qualifiers shared by the CPU (.cpp) and CUDA (.cu) translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CPSL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CPSL_HOST_DEVICE inline
#endif
