// CPU kernels of cpsl_ops::similarity and its backward (schema and math: ops/similarity.cpp).
#include <torch/csrc/stable/library.h>

#include <vector>

#include "cpsl_ops/cpu_tile.h"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/similarity_math.h"
#include "cpsl_ops/stable.h"

namespace cpsl_ops {
namespace {

template <typename acc_t>
struct NormalizedRows {
  std::vector<acc_t> values;            // rows / max(|row|, eps), row-major
  std::vector<acc_t> derivative_scale;  // 1 / max(|row|, eps) (similarity_math.h for huge rows)
  std::vector<acc_t> switch_on;         // projection switch of the normalization's derivative
};

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
NormalizedRows<acc_t> normalize_rows(const Tensor& matrix) {
  const Tensor m = torch::stable::contiguous(matrix);
  const scalar_t* data = data_of<const scalar_t>(m);
  const int64_t rows = m.size(0), cols = m.size(1);
  NormalizedRows<acc_t> out{std::vector<acc_t>(rows * cols), std::vector<acc_t>(rows), std::vector<acc_t>(rows)};
  for (int64_t r = 0; r < rows; ++r) {
    const auto value = [&](int64_t c) { return static_cast<acc_t>(data[r * cols + c]); };
    acc_t scale = 1, squared = scaled_squared_norm(value, cols, scale);
    if (norm_overflows(squared)) {
      scale = row_overflow_scale<acc_t>(value, cols);
      squared = scaled_squared_norm(value, cols, scale);
    }
    const acc_t inverse = inverse_clamped_norm(squared);
    out.derivative_scale[r] = scale * inverse;
    out.switch_on[r] = projection_switch(squared);
    for (int64_t c = 0; c < cols; ++c) out.values[r * cols + c] = value(c) * scale * inverse;
  }
  return out;
}

// Per pixel of a tile: the inverse norm of its (rescaled) features, the derivative scale and the
// projection switch of its normalization (similarity_math.h).
template <typename acc_t>
struct TileNorms {
  acc_t inv_norm[kPixelTile], derivative_scale[kPixelTile], switch_on[kPixelTile];
};

// Per tile: cosines[k * kPixelTile + j] and the pixels' norms. A pixel whose squared norm
// overflows is rescaled in the tile, by a power of two (similarity_math.h).
template <typename acc_t>
void tile_cosines(acc_t* tile, const acc_t* prototypes_hat, int64_t channels, int64_t classes, int64_t count,
                  acc_t* cosines, TileNorms<acc_t>& norms) {
  acc_t squared[kPixelTile] = {};
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t j = 0; j < count; ++j) squared[j] += tile[c * kPixelTile + j] * tile[c * kPixelTile + j];
  for (int64_t j = 0; j < count; ++j) {
    acc_t scale = 1;
    if (norm_overflows(squared[j])) {
      const auto value = [&](int64_t c) { return tile[c * kPixelTile + j]; };
      scale = row_overflow_scale<acc_t>(value, channels);
      squared[j] = scaled_squared_norm(value, channels, scale);
      for (int64_t c = 0; c < channels; ++c) tile[c * kPixelTile + j] *= scale;
    }
    norms.inv_norm[j] = inverse_clamped_norm(squared[j]);
    norms.derivative_scale[j] = scale * norms.inv_norm[j];
    norms.switch_on[j] = projection_switch(squared[j]);
  }
  for (int64_t k = 0; k < classes; ++k) {
    acc_t* row = cosines + k * kPixelTile;
    std::fill(row, row + count, acc_t(0));
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t weight = prototypes_hat[k * channels + c];
      for (int64_t j = 0; j < count; ++j) row[j] += weight * tile[c * kPixelTile + j];
    }
    for (int64_t j = 0; j < count; ++j) row[j] *= norms.inv_norm[j];
  }
}

template <typename scalar_t>
void similarity_forward_kernel(const Tensor& features, const Tensor& prototypes, double temperature,
                               const Tensor& logits) {
  using acc_t = acc_type<scalar_t>;
  const Strided3d<const scalar_t> f(as_batch_channel_pixel(features));
  const Tensor logits_view = as_batch_channel_pixel(logits);
  const Strided3d<scalar_t> out(logits_view);
  const int64_t channels = prototypes.size(1), classes = prototypes.size(0);
  const PixelTiles tiles(logits_view.size(2));
  const auto prototypes_hat = normalize_rows<scalar_t>(prototypes);
  const acc_t inv_temperature = acc_t(1) / static_cast<acc_t>(temperature);

  torch::stable::parallel_for(0, logits_view.size(0) * tiles.per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(channels * kPixelTile), cosines(classes * kPixelTile);
    TileNorms<acc_t> norms;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = tiles.image(t), p0 = tiles.first_pixel(t), count = tiles.count(t);
      load_pixel_tile(f, b, channels, p0, count, tile.data());
      tile_cosines(tile.data(), prototypes_hat.values.data(), channels, classes, count, cosines.data(), norms);
      for (int64_t k = 0; k < classes; ++k)
        for (int64_t j = 0; j < count; ++j)
          out(b, k, p0 + j) = static_cast<scalar_t>(cosines[k * kPixelTile + j] * inv_temperature);
    }
  });
}

template <typename scalar_t>
void similarity_backward_kernel(const Tensor& grad_logits, const Tensor& features, const Tensor& prototypes,
                                double temperature, const Tensor& grad_features, const Tensor& grad_prototypes) {
  using acc_t = acc_type<scalar_t>;
  const Strided3d<const scalar_t> f(as_batch_channel_pixel(features));
  const Strided3d<const scalar_t> grad(as_batch_channel_pixel(grad_logits));
  const Tensor grad_features_view = as_batch_channel_pixel(grad_features);
  const Strided3d<scalar_t> grad_f(grad_features_view);
  const int64_t batch = grad_features_view.size(0), channels = prototypes.size(1), classes = prototypes.size(0);
  const PixelTiles tiles(grad_features_view.size(2));
  const auto prototypes_hat = normalize_rows<scalar_t>(prototypes);
  const acc_t inv_temperature = acc_t(1) / static_cast<acc_t>(temperature);

  // grad wrt the normalized prototypes, summed per fixed block of tiles and merged in order.
  const int64_t total_tiles = batch * tiles.per_image;
  const int64_t block = deterministic_block_size(total_tiles, 16, 64);
  const int64_t num_blocks = (total_tiles + block - 1) / block;
  std::vector<acc_t> partial(num_blocks * classes * channels, acc_t(0));

  torch::stable::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> tile(channels * kPixelTile), cosines(classes * kPixelTile), g(classes * kPixelTile);
    TileNorms<acc_t> norms;
    acc_t grad_dot_cos[kPixelTile], grad_hat[kPixelTile];
    acc_t normalized[kPixelTile];  // one channel of the tile's normalized features
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      acc_t* grad_prototypes_hat = partial.data() + blk * classes * channels;
      for (int64_t t = blk * block; t < std::min(total_tiles, (blk + 1) * block); ++t) {
        const int64_t b = tiles.image(t), p0 = tiles.first_pixel(t), count = tiles.count(t);
        load_pixel_tile(f, b, channels, p0, count, tile.data());
        tile_cosines(tile.data(), prototypes_hat.values.data(), channels, classes, count, cosines.data(), norms);
        std::fill(grad_dot_cos, grad_dot_cos + kPixelTile, acc_t(0));
        for (int64_t k = 0; k < classes; ++k)
          for (int64_t j = 0; j < count; ++j) {
            g[k * kPixelTile + j] = static_cast<acc_t>(grad(b, k, p0 + j)) * inv_temperature;
            grad_dot_cos[j] += g[k * kPixelTile + j] * cosines[k * kPixelTile + j];
          }
        for (int64_t c = 0; c < channels; ++c) {
          std::fill(grad_hat, grad_hat + count, acc_t(0));
          for (int64_t j = 0; j < count; ++j) normalized[j] = tile[c * kPixelTile + j] * norms.inv_norm[j];
          for (int64_t k = 0; k < classes; ++k) {
            const acc_t weight = prototypes_hat.values[k * channels + c];
            const acc_t* __restrict g_row = g.data() + k * kPixelTile;
            acc_t prototype_grad = 0;
#pragma omp simd reduction(+ : prototype_grad)
            for (int64_t j = 0; j < count; ++j) {
              grad_hat[j] += weight * g_row[j];
              prototype_grad += g_row[j] * normalized[j];
            }
            grad_prototypes_hat[k * channels + c] += prototype_grad;
          }
          for (int64_t j = 0; j < count; ++j)
            grad_f(b, c, p0 + j) = static_cast<scalar_t>(normalized_input_grad(
                grad_hat[j], grad_dot_cos[j], normalized[j], norms.derivative_scale[j], norms.switch_on[j]));
        }
      }
    }
  });

  std::vector<acc_t> total(classes * channels, acc_t(0));
  for (int64_t blk = 0; blk < num_blocks; ++blk)
    for (int64_t i = 0; i < classes * channels; ++i) total[i] += partial[blk * classes * channels + i];
  scalar_t* out = data_of<scalar_t>(grad_prototypes);
  for (int64_t k = 0; k < classes; ++k) {
    acc_t grad_dot_hat = 0;
    for (int64_t c = 0; c < channels; ++c) grad_dot_hat += total[k * channels + c] * prototypes_hat.values[k * channels + c];
    for (int64_t c = 0; c < channels; ++c)
      out[k * channels + c] = static_cast<scalar_t>(
          normalized_input_grad(total[k * channels + c], grad_dot_hat, prototypes_hat.values[k * channels + c],
                                prototypes_hat.derivative_scale[k], prototypes_hat.switch_on[k]));
  }
}

Tensor similarity_cpu(const Tensor& features, const Tensor& prototypes, double temperature) {
  check_similarity_inputs(features, prototypes, temperature);
  const Tensor logits = empty_on(features, logits_shape(features, prototypes.size(0)), features.scalar_type());
  if (logits.numel() == 0) return logits;
  dispatch_floating(features.scalar_type(), "similarity", [&](auto tag) {
    similarity_forward_kernel<decltype(tag)>(features, prototypes, temperature, logits);
  });
  return logits;
}

std::tuple<Tensor, Tensor> similarity_backward_cpu(const Tensor& grad_logits, const Tensor& features,
                                                   const Tensor& prototypes, double temperature) {
  check_similarity_backward_inputs(grad_logits, features, prototypes, temperature);
  const Tensor grad_features = empty_on(features, features.sizes(), features.scalar_type());
  const Tensor grad_prototypes = zeros_on(prototypes, prototypes.sizes(), prototypes.scalar_type());
  if (grad_features.numel() == 0) return {grad_features, grad_prototypes};
  const Tensor grad = torch::stable::to(grad_logits, features.scalar_type());
  dispatch_floating(features.scalar_type(), "similarity_backward", [&](auto tag) {
    similarity_backward_kernel<decltype(tag)>(grad, features, prototypes, temperature, grad_features, grad_prototypes);
  });
  return {grad_features, grad_prototypes};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(cpsl_ops, CPU, m) {
  m.impl("similarity", TORCH_BOX(&similarity_cpu));
  m.impl("similarity_backward", TORCH_BOX(&similarity_backward_cpu));
}

}  // namespace cpsl_ops
