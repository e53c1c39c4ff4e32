// CPU-only arithmetic that compilers can vectorize: an exp without a libm call or errno, so that
// loops over it become SIMD code (AVX2 when the build enables it, SSE2 otherwise).
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>

namespace cpsl_ops {

// e^x for float with a relative error below 2.5e-7 (about 2 ulp) on [-87, 88]; 0 below -87, where
// the true value is a denormal; the inputs are finite (the kernels check them first).
// Cody-Waite reduction x = n ln2 + r with |r| <= ln2/2 (n rounded by the 1.5 * 2^23 trick, whose
// low mantissa bits then hold n), the degree-6 Taylor polynomial of e^r (truncation error
// |r|^7/7! < 1.3e-7), and the exact scaling by 2^n through the exponent bits. Branch-free, so
// loops over it vectorize (with -fno-trapping-math, which setup.py passes).
inline float vector_exp(float x) {
  constexpr float kRoundingShift = 12582912.0f;  // 1.5 * 2^23
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifted = clamped * 1.44269504088896341f + kRoundingShift;
  const float n = shifted - kRoundingShift;
  // ln2 split in two so that n * ln2_hi is exact.
  const float r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t exponent = std::bit_cast<int32_t>(shifted) - std::bit_cast<int32_t>(kRoundingShift) + 127;
  const float scale = std::bit_cast<float>(exponent << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

// fp64 inputs keep libm's exp: they are for checking, not for speed.
inline double vector_exp(double x) { return std::exp(x); }

}  // namespace cpsl_ops
