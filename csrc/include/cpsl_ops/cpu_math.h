// CPU-only arithmetic that compilers can vectorize: an exp without a libm call or errno, so that
// loops over it become SIMD code (AVX2 when the build enables it, SSE2 otherwise).
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace cpsl_ops {

// Eight floats or doubles as one value (GCC/Clang vector extensions): whole-register arithmetic
// that needs no help from the auto-vectorizer, on whatever SIMD width the build targets.
// They only pass between inline functions of one translation unit, so the psABI note that their
// calling convention depends on the ISA flags does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
constexpr int64_t kLanes = 8;
typedef float FloatLanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint32_t FloatLaneBits __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef double DoubleLanes __attribute__((vector_size(kLanes * sizeof(double))));

template <typename acc_t>
using LanesOf = std::conditional_t<std::is_same_v<acc_t, float>, FloatLanes, DoubleLanes>;

template <typename Lanes, typename acc_t>
inline Lanes load_lanes(const acc_t* source) {
  Lanes lanes;
  std::memcpy(&lanes, source, sizeof(lanes));
  return lanes;
}

template <typename Lanes, typename acc_t>
inline void store_lanes(acc_t* destination, const Lanes& lanes) {
  std::memcpy(destination, &lanes, sizeof(lanes));
}

template <typename Lanes>
inline Lanes lanes_max(Lanes a, Lanes b) {
  return a > b ? a : b;
}

// e^x for float x <= 88 (a float or FloatLanes), with a relative error below 2.5e-7 (about 2 ulp)
// on [-87, 88]. Cody-Waite reduction x = n ln2 + r with |r| <= ln2/2 (n rounded by the 1.5 * 2^23
// trick, whose low mantissa bits then hold n), the degree-6 Taylor polynomial of e^r (truncation
// error |r|^7/7! < 1.3e-7), and the exact scaling by 2^n through the exponent bits. Below -87 the
// exponent bits wrap (defined: unsigned), and vector_exp returns 0 there instead.
template <typename Value, typename Bits>
inline Value exp_unmasked(Value x) {
  constexpr float kRoundingShift = 12582912.0f;  // 1.5 * 2^23
  const Value shifted = x * 1.44269504088896341f + kRoundingShift;
  const Value n = shifted - kRoundingShift;
  // ln2 split in two so that n * ln2_hi is exact.
  const Value r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  Value p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const Bits exponent = std::bit_cast<Bits>(shifted) - std::bit_cast<uint32_t>(kRoundingShift) + 127u;
  return p * std::bit_cast<Value>(exponent << 23);
}

// e^x for x <= 88: 0 below -87 (where the true value is a denormal), -inf included. Every caller
// passes a value minus a maximum (x <= 0), so there is no upper clamp: a select there costs the
// kernels a tenth of their time, because GCC turns it into blends, slow on AMD. Branch-free, so
// loops over the scalar form vectorize (with -fno-trapping-math, which setup.py passes).
inline float vector_exp(float x) { return x < -87.0f ? 0.0f : exp_unmasked<float, uint32_t>(x); }

inline FloatLanes vector_exp(FloatLanes x) {
  const FloatLaneBits in_range = reinterpret_cast<FloatLaneBits>(x >= -87.0f);
  return reinterpret_cast<FloatLanes>(reinterpret_cast<FloatLaneBits>(exp_unmasked<FloatLanes, FloatLaneBits>(x)) &
                                      in_range);
}

// fp64 inputs keep libm's exp: they are for checking, not for speed.
inline double vector_exp(double x) { return std::exp(x); }

inline DoubleLanes vector_exp(DoubleLanes x) {
  for (int64_t l = 0; l < kLanes; ++l) x[l] = std::exp(x[l]);
  return x;
}

#if defined(__AVX2__)
// dst[j * dst_stride + i] = src[i * src_stride + j] (· column_scale[j]) for an 8 × 8 block, in
// registers.
inline void transpose_8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride,
                          const float* column_scale) {
  __m256 rows[8], pairs[8];
  for (int i = 0; i < 8; ++i) rows[i] = _mm256_loadu_ps(src + i * src_stride);
  if (column_scale != nullptr) {
    const __m256 scale = _mm256_loadu_ps(column_scale);
    for (int i = 0; i < 8; ++i) rows[i] = _mm256_mul_ps(rows[i], scale);
  }
  // pairs[i] interleaves rows i and i + 1: columns 0,1 | 4,5 (even i) or 2,3 | 6,7 (odd i).
  for (int i = 0; i < 8; i += 2) {
    pairs[i] = _mm256_unpacklo_ps(rows[i], rows[i + 1]);
    pairs[i + 1] = _mm256_unpackhi_ps(rows[i], rows[i + 1]);
  }
  // rows[q + j] now holds column j (low half) and column j + 4 (high half) of rows q..q+3.
  for (int q = 0; q < 8; q += 4) {
    rows[q] = _mm256_shuffle_ps(pairs[q], pairs[q + 2], 0x44);
    rows[q + 1] = _mm256_shuffle_ps(pairs[q], pairs[q + 2], 0xEE);
    rows[q + 2] = _mm256_shuffle_ps(pairs[q + 1], pairs[q + 3], 0x44);
    rows[q + 3] = _mm256_shuffle_ps(pairs[q + 1], pairs[q + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * dst_stride, _mm256_permute2f128_ps(rows[j], rows[j + 4], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * dst_stride, _mm256_permute2f128_ps(rows[j], rows[j + 4], 0x31));
  }
}
#endif

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols, converting the type,
// times column_scale[j] when one is given (which saves the caller a pass over src).
// The kernels vectorize over rows inside class-major tiles while tensors are row-major (N, K); left
// to the compiler, this copy becomes one scalar move per element, a third of Sinkhorn's time at
// large N. With AVX2, float blocks of 8 × 8 go through registers, and when a side is not a
// multiple of 8 its last block starts 8 before its end, overlapping the previous block (whose
// values it writes again, unchanged) instead of leaving a scalar edge: K = 19 would otherwise
// move 3 of its 19 classes one element at a time.
template <typename Src, typename Dst>
inline void transpose(const Src* src, int64_t src_stride, int64_t rows, int64_t cols, Dst* dst, int64_t dst_stride,
                      const Src* column_scale = nullptr) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<Src, float> && std::is_same_v<Dst, float>) {
    if (rows >= 8 && cols >= 8) {
      for (int64_t i_block = 0; i_block < rows; i_block += 8)
        for (int64_t j_block = 0; j_block < cols; j_block += 8) {
          const int64_t i = std::min(i_block, rows - 8), j = std::min(j_block, cols - 8);
          transpose_8x8(src + i * src_stride + j, src_stride, dst + j * dst_stride + i, dst_stride,
                        column_scale == nullptr ? nullptr : column_scale + j);
        }
      return;
    }
  }
#endif
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      dst[j * dst_stride + i] =
          static_cast<Dst>(column_scale == nullptr ? src[i * src_stride + j] : src[i * src_stride + j] * column_scale[j]);
}

}  // namespace cpsl_ops
