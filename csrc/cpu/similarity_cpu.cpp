// CPU kernels of cpsl_ops::similarity and its backward, both metrics (schema: ops/similarity.cpp;
// math: similarity_math.h).
#include <torch/csrc/stable/library.h>

#include <string>
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

// The prototypes as rows of acc_t, unnormalized: the euclidean metric's.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
std::vector<acc_t> rows_of(const Tensor& matrix) {
  const Tensor m = torch::stable::contiguous(matrix);
  const scalar_t* data = data_of<const scalar_t>(m);
  std::vector<acc_t> out(m.numel());
  for (int64_t i = 0; i < m.numel(); ++i) out[i] = static_cast<acc_t>(data[i]);
  return out;
}

// Per tile: distances[k * kPixelTile + j] = ||f_j - c_k||, summed from the differences
// (similarity_math.h).
template <typename acc_t>
void tile_distances(const acc_t* tile, const acc_t* prototypes, int64_t channels, int64_t classes, int64_t count,
                    acc_t* distances) {
  for (int64_t k = 0; k < classes; ++k) {
    acc_t* row = distances + k * kPixelTile;
    std::fill(row, row + count, acc_t(0));
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t centre = prototypes[k * channels + c];
      for (int64_t j = 0; j < count; ++j) {
        const acc_t difference = tile[c * kPixelTile + j] - centre;
        row[j] += difference * difference;
      }
    }
    for (int64_t j = 0; j < count; ++j) row[j] = std::sqrt(row[j]);
  }
}

template <typename scalar_t, SimilarityMetric metric>
void similarity_forward_kernel(const Tensor& features, const Tensor& prototypes, double temperature,
                               const Tensor& logits) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kCosine = metric == SimilarityMetric::kCosine;
  const Strided3d<const scalar_t> f(as_batch_channel_pixel(features));
  const Tensor logits_view = as_batch_channel_pixel(logits);
  const Strided3d<scalar_t> out(logits_view);
  const int64_t channels = prototypes.size(1), classes = prototypes.size(0);
  const PixelTiles tiles(logits_view.size(2));
  const std::vector<acc_t> centres = kCosine ? normalize_rows<scalar_t>(prototypes).values : rows_of<scalar_t>(prototypes);
  // logits = cosine / τ or -distance / τ
  const acc_t logit_scale = (kCosine ? acc_t(1) : acc_t(-1)) / static_cast<acc_t>(temperature);

  torch::stable::parallel_for(0, logits_view.size(0) * tiles.per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(channels * kPixelTile), values(classes * kPixelTile);
    TileNorms<acc_t> norms;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = tiles.image(t), p0 = tiles.first_pixel(t), count = tiles.count(t);
      load_pixel_tile(f, b, channels, p0, count, tile.data());
      if constexpr (kCosine)
        tile_cosines(tile.data(), centres.data(), channels, classes, count, values.data(), norms);
      else
        tile_distances(tile.data(), centres.data(), channels, classes, count, values.data());
      for (int64_t k = 0; k < classes; ++k)
        for (int64_t j = 0; j < count; ++j)
          out(b, k, p0 + j) = static_cast<scalar_t>(values[k * kPixelTile + j] * logit_scale);
    }
  });
}

// Σ over all tiles of each tile's (K, D) contribution to a prototype gradient, in a fixed order
// whatever the thread count: tile_body(t, partial) adds tile t's into partial, tiles are summed
// per fixed block of tiles in order, and the blocks' sums in block order. tile_body is called with
// per-thread scratch made by make_scratch().
template <typename acc_t, typename MakeScratch, typename TileBody>
std::vector<acc_t> sum_over_tiles_in_order(int64_t total_tiles, int64_t size, const MakeScratch& make_scratch,
                                           const TileBody& tile_body) {
  const int64_t block = deterministic_block_size(total_tiles, 16, 64);
  const int64_t num_blocks = (total_tiles + block - 1) / block;
  std::vector<acc_t> partial(num_blocks * size, acc_t(0));
  torch::stable::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    auto scratch = make_scratch();
    for (int64_t blk = block_begin; blk < block_end; ++blk)
      for (int64_t t = blk * block; t < std::min(total_tiles, (blk + 1) * block); ++t)
        tile_body(t, partial.data() + blk * size, scratch);
  });
  std::vector<acc_t> total(size, acc_t(0));
  for (int64_t blk = 0; blk < num_blocks; ++blk)
    for (int64_t i = 0; i < size; ++i) total[i] += partial[blk * size + i];
  return total;
}

// The views of one backward call, shared by both metrics.
template <typename scalar_t>
struct BackwardViews {
  Strided3d<const scalar_t> features, grad_logits;
  Strided3d<scalar_t> grad_features;
  int64_t channels, classes;
  PixelTiles tiles;
  int64_t total_tiles;

  BackwardViews(const Tensor& grad, const Tensor& f, const Tensor& prototypes, const Tensor& grad_f)
      : features(as_batch_channel_pixel(f)),
        grad_logits(as_batch_channel_pixel(grad)),
        grad_features(as_batch_channel_pixel(grad_f)),
        channels(prototypes.size(1)),
        classes(prototypes.size(0)),
        tiles(grad_features.tensor.size(2)),
        total_tiles(grad_features.tensor.size(0) * tiles.per_image) {}
};

// Per-thread scratch of a backward: the tile, K values per pixel and the incoming gradients / τ.
template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> tile, values, g;
  BackwardScratch(int64_t channels, int64_t classes)
      : tile(channels * kPixelTile), values(classes * kPixelTile), g(classes * kPixelTile) {}
};

template <typename scalar_t>
void cosine_backward_kernel(const Tensor& grad_logits, const Tensor& features, const Tensor& prototypes,
                            double temperature, const Tensor& grad_features, const Tensor& grad_prototypes) {
  using acc_t = acc_type<scalar_t>;
  const BackwardViews<scalar_t> v(grad_logits, features, prototypes, grad_features);
  const int64_t channels = v.channels, classes = v.classes;
  const auto prototypes_hat = normalize_rows<scalar_t>(prototypes);
  const acc_t inv_temperature = acc_t(1) / static_cast<acc_t>(temperature);

  // the gradient with respect to the normalized prototypes
  const std::vector<acc_t> total = sum_over_tiles_in_order<acc_t>(
      v.total_tiles, classes * channels, [&] { return BackwardScratch<acc_t>(channels, classes); },
      [&](int64_t t, acc_t* grad_prototypes_hat, BackwardScratch<acc_t>& scratch) {
        TileNorms<acc_t> norms;
        acc_t grad_dot_cos[kPixelTile] = {}, grad_hat[kPixelTile];
        acc_t normalized[kPixelTile];  // one channel of the tile's normalized features
        const acc_t* tile = scratch.tile.data();
        const int64_t b = v.tiles.image(t), p0 = v.tiles.first_pixel(t), count = v.tiles.count(t);
        load_pixel_tile(v.features, b, channels, p0, count, scratch.tile.data());
        tile_cosines(scratch.tile.data(), prototypes_hat.values.data(), channels, classes, count,
                     scratch.values.data(), norms);
        for (int64_t k = 0; k < classes; ++k)
          for (int64_t j = 0; j < count; ++j) {
            scratch.g[k * kPixelTile + j] = static_cast<acc_t>(v.grad_logits(b, k, p0 + j)) * inv_temperature;
            grad_dot_cos[j] += scratch.g[k * kPixelTile + j] * scratch.values[k * kPixelTile + j];
          }
        for (int64_t c = 0; c < channels; ++c) {
          std::fill(grad_hat, grad_hat + count, acc_t(0));
          for (int64_t j = 0; j < count; ++j) normalized[j] = tile[c * kPixelTile + j] * norms.inv_norm[j];
          for (int64_t k = 0; k < classes; ++k) {
            const acc_t weight = prototypes_hat.values[k * channels + c];
            const acc_t* __restrict g_row = scratch.g.data() + k * kPixelTile;
            acc_t prototype_grad = 0;
#pragma omp simd reduction(+ : prototype_grad)
            for (int64_t j = 0; j < count; ++j) {
              grad_hat[j] += weight * g_row[j];
              prototype_grad += g_row[j] * normalized[j];
            }
            grad_prototypes_hat[k * channels + c] += prototype_grad;
          }
          for (int64_t j = 0; j < count; ++j)
            v.grad_features(b, c, p0 + j) = static_cast<scalar_t>(normalized_input_grad(
                grad_hat[j], grad_dot_cos[j], normalized[j], norms.derivative_scale[j], norms.switch_on[j]));
        }
      });

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

// grad_f = -Σ_k w_k (f - c_k) and grad_c_k = Σ_pixels w_k (f - c_k), w_k = distance_grad_weight(g_k / τ, d_k)
// (similarity_math.h): both sums of the same products, one channel of the tile at a time.
template <typename scalar_t>
void euclidean_backward_kernel(const Tensor& grad_logits, const Tensor& features, const Tensor& prototypes,
                               double temperature, const Tensor& grad_features, const Tensor& grad_prototypes) {
  using acc_t = acc_type<scalar_t>;
  const BackwardViews<scalar_t> v(grad_logits, features, prototypes, grad_features);
  const int64_t channels = v.channels, classes = v.classes;
  const std::vector<acc_t> centres = rows_of<scalar_t>(prototypes);
  const acc_t inv_temperature = acc_t(1) / static_cast<acc_t>(temperature);

  const std::vector<acc_t> total = sum_over_tiles_in_order<acc_t>(
      v.total_tiles, classes * channels, [&] { return BackwardScratch<acc_t>(channels, classes); },
      [&](int64_t t, acc_t* grad_centres, BackwardScratch<acc_t>& scratch) {
        acc_t grad_f[kPixelTile];  // one channel of the tile's feature gradient, negated
        const acc_t* tile = scratch.tile.data();
        const int64_t b = v.tiles.image(t), p0 = v.tiles.first_pixel(t), count = v.tiles.count(t);
        load_pixel_tile(v.features, b, channels, p0, count, scratch.tile.data());
        tile_distances(tile, centres.data(), channels, classes, count, scratch.values.data());
        for (int64_t k = 0; k < classes; ++k)
          for (int64_t j = 0; j < count; ++j)
            scratch.g[k * kPixelTile + j] = distance_grad_weight(
                static_cast<acc_t>(v.grad_logits(b, k, p0 + j)) * inv_temperature, scratch.values[k * kPixelTile + j]);
        for (int64_t c = 0; c < channels; ++c) {
          std::fill(grad_f, grad_f + count, acc_t(0));
          const acc_t* __restrict x = tile + c * kPixelTile;
          for (int64_t k = 0; k < classes; ++k) {
            const acc_t centre = centres[k * channels + c];
            const acc_t* __restrict w = scratch.g.data() + k * kPixelTile;
            acc_t centre_grad = 0;
#pragma omp simd reduction(+ : centre_grad)
            for (int64_t j = 0; j < count; ++j) {
              const acc_t weighted = w[j] * (x[j] - centre);
              grad_f[j] += weighted;
              centre_grad += weighted;
            }
            grad_centres[k * channels + c] += centre_grad;
          }
          for (int64_t j = 0; j < count; ++j) v.grad_features(b, c, p0 + j) = static_cast<scalar_t>(-grad_f[j]);
        }
      });

  scalar_t* out = data_of<scalar_t>(grad_prototypes);
  for (int64_t i = 0; i < classes * channels; ++i) out[i] = static_cast<scalar_t>(total[i]);
}

Tensor similarity_cpu(const Tensor& features, const Tensor& prototypes, double temperature, std::string metric) {
  check_similarity_inputs(features, prototypes, temperature);
  const SimilarityMetric kind = similarity_metric(metric);
  const Tensor logits = empty_on(features, logits_shape(features, prototypes.size(0)), features.scalar_type());
  if (logits.numel() == 0) return logits;
  dispatch_floating(features.scalar_type(), "similarity", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (kind == SimilarityMetric::kCosine)
      similarity_forward_kernel<scalar_t, SimilarityMetric::kCosine>(features, prototypes, temperature, logits);
    else
      similarity_forward_kernel<scalar_t, SimilarityMetric::kEuclidean>(features, prototypes, temperature, logits);
  });
  return logits;
}

std::tuple<Tensor, Tensor> similarity_backward_cpu(const Tensor& grad_logits, const Tensor& features,
                                                   const Tensor& prototypes, double temperature, std::string metric) {
  check_similarity_backward_inputs(grad_logits, features, prototypes, temperature);
  const SimilarityMetric kind = similarity_metric(metric);
  const Tensor grad_features = empty_on(features, features.sizes(), features.scalar_type());
  const Tensor grad_prototypes = zeros_on(prototypes, prototypes.sizes(), prototypes.scalar_type());
  if (grad_features.numel() == 0) return {grad_features, grad_prototypes};
  const Tensor grad = torch::stable::to(grad_logits, features.scalar_type());
  dispatch_floating(features.scalar_type(), "similarity_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (kind == SimilarityMetric::kCosine)
      cosine_backward_kernel<scalar_t>(grad, features, prototypes, temperature, grad_features, grad_prototypes);
    else
      euclidean_backward_kernel<scalar_t>(grad, features, prototypes, temperature, grad_features, grad_prototypes);
  });
  return {grad_features, grad_prototypes};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(cpsl_ops, CPU, m) {
  m.impl("similarity", TORCH_BOX(&similarity_cpu));
  m.impl("similarity_backward", TORCH_BOX(&similarity_backward_cpu));
}

}  // namespace cpsl_ops
