// Helpers of the CPU kernels: strided element access and tiles of pixels loaded in the
// accumulation type, so that one loop body serves every dtype and layout.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpsl_ops/stable.h"

namespace cpsl_ops {

// Pixels per tile. A D×64 fp32 tile of D = 256 (64 KiB) stays in L2 while it is used.
constexpr int64_t kPixelTile = 64;

// Element (i, j, l) of a 3-d tensor with arbitrary strides. It holds the tensor, so a view that
// had to be copied (as_batch_channel_pixel of unmergeable strides) lives as long as the accessor.
// Hidden, as the stable Tensor it holds is.
template <typename T>
struct __attribute__((visibility("hidden"))) Strided3d {
  Tensor tensor;
  T* data;
  int64_t stride0, stride1, stride2;

  explicit Strided3d(Tensor t)
      : tensor(std::move(t)),
        data(data_of<T>(tensor)),
        stride0(tensor.stride(0)),
        stride1(tensor.stride(1)),
        stride2(tensor.stride(2)) {}

  T& operator()(int64_t i, int64_t j, int64_t l) const { return data[i * stride0 + j * stride1 + l * stride2]; }
};

// Copies channels × [p0, p0 + count) of image b into tile[c * kPixelTile + j], converting to acc_t.
// The loop order follows the smaller stride so that either layout is read sequentially.
template <typename scalar_t, typename acc_t>
void load_pixel_tile(const Strided3d<const scalar_t>& src, int64_t b, int64_t channels, int64_t p0, int64_t count,
                     acc_t* tile) {
  if (src.stride2 <= src.stride1) {
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t j = 0; j < count; ++j) tile[c * kPixelTile + j] = static_cast<acc_t>(src(b, c, p0 + j));
  } else {
    for (int64_t j = 0; j < count; ++j)
      for (int64_t c = 0; c < channels; ++c) tile[c * kPixelTile + j] = static_cast<acc_t>(src(b, c, p0 + j));
  }
}

// The tiles of a (B, ·, P) problem, numbered image by image.
struct PixelTiles {
  int64_t pixels, per_image;

  explicit PixelTiles(int64_t num_pixels) : pixels(num_pixels), per_image((num_pixels + kPixelTile - 1) / kPixelTile) {}
  int64_t image(int64_t tile) const { return tile / per_image; }
  int64_t first_pixel(int64_t tile) const { return (tile % per_image) * kPixelTile; }
  int64_t count(int64_t tile) const { return std::min(kPixelTile, pixels - first_pixel(tile)); }
};

}  // namespace cpsl_ops
