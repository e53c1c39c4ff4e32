// CPU kernel of cpsl_ops::update_prototypes (schema: ops/prototype_update.cpp).
#include <torch/csrc/stable/library.h>

#include <atomic>
#include <vector>

#include "cpsl_ops/cpu_tile.h"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/prototype_update_math.h"
#include "cpsl_ops/stable.h"

namespace cpsl_ops {
namespace {

template <typename scalar_t, typename label_t>
void update_prototypes_kernel(const Tensor& prototypes, const Tensor& features, const Tensor& labels, double momentum,
                              int64_t ignore_index, const Tensor& new_prototypes, const Tensor& counts) {
  using acc_t = acc_type<scalar_t>;
  const Strided3d<const scalar_t> f(as_batch_channel_pixel(features));
  const Tensor label_view = as_batch_pixel(labels);
  const label_t* label_data = data_of<const label_t>(label_view);
  const int64_t label_stride0 = label_view.stride(0), label_stride1 = label_view.stride(1);
  const int64_t classes = prototypes.size(0), channels = prototypes.size(1);
  const PixelTiles tiles(label_view.size(1));
  const int64_t total_tiles = label_view.size(0) * tiles.per_image;
  const int64_t block = deterministic_block_size(total_tiles, 64, 64);
  const int64_t num_blocks = (total_tiles + block - 1) / block;

  std::vector<acc_t> partial_sums(num_blocks * classes * channels, acc_t(0));
  std::vector<int64_t> partial_counts(num_blocks * classes, 0);
  std::atomic<bool> bad_label{false};
  std::atomic<int64_t> bad_value{0};

  torch::stable::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    int64_t tile_labels[kPixelTile];
    std::vector<acc_t> pixel_major(kPixelTile * channels);
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      acc_t* sums = partial_sums.data() + blk * classes * channels;
      int64_t* block_counts = partial_counts.data() + blk * classes;
      for (int64_t t = blk * block; t < std::min(total_tiles, (blk + 1) * block); ++t) {
        const int64_t b = tiles.image(t), p0 = tiles.first_pixel(t), count = tiles.count(t);
        for (int64_t j = 0; j < count; ++j) {
          const int64_t label = static_cast<int64_t>(label_data[b * label_stride0 + (p0 + j) * label_stride1]);
          if (label == ignore_index) {
            tile_labels[j] = -1;
          } else if (label < 0 || label >= classes) {
            tile_labels[j] = -1;
            bad_value = label;
            bad_label = true;
          } else {
            tile_labels[j] = label;
            ++block_counts[label];
          }
        }
        // Pixel-major, so that each pixel adds a contiguous row of D channels to its class sum.
        for (int64_t c = 0; c < channels; ++c)
          for (int64_t j = 0; j < count; ++j) pixel_major[j * channels + c] = static_cast<acc_t>(f(b, c, p0 + j));
        for (int64_t j = 0; j < count; ++j) {
          if (tile_labels[j] < 0) continue;
          acc_t* __restrict class_sum = sums + tile_labels[j] * channels;
          const acc_t* __restrict pixel = pixel_major.data() + j * channels;
          for (int64_t c = 0; c < channels; ++c) class_sum[c] += pixel[c];
        }
      }
    }
  });
  CPSL_CHECK_VALUE(!bad_label, "update_prototypes: labels must lie in [0, ", classes, ") or equal ignore_index=",
                    ignore_index, ", found ", bad_value.load());

  const Tensor old = torch::stable::contiguous(prototypes);
  const scalar_t* old_data = data_of<const scalar_t>(old);
  scalar_t* out = data_of<scalar_t>(new_prototypes);
  int64_t* count_out = data_of<int64_t>(counts);
  const acc_t keep = static_cast<acc_t>(momentum);
  for (int64_t k = 0; k < classes; ++k) {
    int64_t n = 0;
    for (int64_t blk = 0; blk < num_blocks; ++blk) n += partial_counts[blk * classes + k];
    count_out[k] = n;
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t previous = static_cast<acc_t>(old_data[k * channels + c]);
      acc_t sum = 0;
      for (int64_t blk = 0; blk < num_blocks; ++blk) sum += partial_sums[(blk * classes + k) * channels + c];
      out[k * channels + c] = static_cast<scalar_t>(ema_class_mean(previous, sum, n, keep));
    }
  }
}

std::tuple<Tensor, Tensor> update_prototypes_cpu(const Tensor& prototypes, const Tensor& features, const Tensor& labels,
                                                 double momentum, int64_t ignore_index) {
  check_update_prototypes_inputs(prototypes, features, labels, momentum);
  const Tensor new_prototypes = empty_on(prototypes, {prototypes.size(0), prototypes.size(1)}, prototypes.scalar_type());
  const Tensor counts = zeros_on(prototypes, {prototypes.size(0)}, ScalarType::Long);
  dispatch_floating(features.scalar_type(), "update_prototypes", [&](auto feature_tag) {
    dispatch_integral(labels.scalar_type(), "update_prototypes", [&](auto label_tag) {
      update_prototypes_kernel<decltype(feature_tag), decltype(label_tag)>(prototypes, features, labels, momentum,
                                                                           ignore_index, new_prototypes, counts);
    });
  });
  return {new_prototypes, counts};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(cpsl_ops, CPU, m) { m.impl("update_prototypes", TORCH_BOX(&update_prototypes_cpu)); }

}  // namespace cpsl_ops
