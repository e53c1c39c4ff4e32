// CPU kernel of cpsl_ops::update_prototypes (schema: ops/prototype_update.cpp; math:
// prototype_update_math.h). Tiles of 64 pixels, pixel-major, each labelled pixel adding its D
// channels to its class's sum in fp64 (class_sum_t); per-block sums merged in block order.
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "cpsl_ops/cpu_math.h"
#include "cpsl_ops/cpu_tile.h"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/prototype_update_math.h"
#include "cpsl_ops/stable.h"

namespace cpsl_ops {
namespace {

// The channels of `count` pixels from p0 on, pixel-major (pixel j's D channels at j * D), so that each
// pixel adds a contiguous row to its class sum: the features themselves when their channels are
// already contiguous (flat (N, D) features), else a converted copy in `buffer`, transposed 8 × 8
// in registers for channel-first float features.
template <typename scalar_t, typename acc_t>
const acc_t* pixel_major_tile(const Strided3d<const scalar_t>& f, int64_t b, int64_t channels, int64_t p0,
                              int64_t count, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (f.stride1 == 1 && f.stride2 == channels) return &f(b, 0, p0);
    if (f.stride2 == 1) {
      transpose(&f(b, 0, p0), f.stride1, channels, count, buffer, channels);
      return buffer;
    }
  }
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t j = 0; j < count; ++j) buffer[j * channels + c] = static_cast<acc_t>(f(b, c, p0 + j));
  return buffer;
}

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
  // Fixed blocks of tiles (deterministic), each with its own class sums: at most 64 blocks, fewer
  // when K × D is so large that their partial sums would pass kPartialSumBytes.
  constexpr int64_t kPartialSumBytes = int64_t(64) << 20;
  const int64_t max_blocks =
      std::clamp<int64_t>(kPartialSumBytes / std::max<int64_t>(1, classes * channels * sizeof(class_sum_t)), 1, 64);
  const int64_t block = deterministic_block_size(total_tiles, 64, max_blocks);
  const int64_t num_blocks = (total_tiles + block - 1) / block;

  std::vector<class_sum_t> partial_sums(num_blocks * classes * channels, class_sum_t(0));
  std::vector<int64_t> partial_counts(num_blocks * classes, 0);
  std::atomic<bool> bad_label{false};
  std::atomic<int64_t> bad_value{0};

  torch::stable::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    int64_t tile_labels[kPixelTile];
    std::vector<acc_t> buffer(kPixelTile * channels);
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      class_sum_t* sums = partial_sums.data() + blk * classes * channels;
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
        const acc_t* pixel_major = pixel_major_tile(f, b, channels, p0, count, buffer.data());
        for (int64_t j = 0; j < count; ++j) {
          if (tile_labels[j] < 0) continue;
          class_sum_t* __restrict class_sum = sums + tile_labels[j] * channels;
          const acc_t* __restrict pixel = pixel_major + j * channels;
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
  bool finite = true;
  for (int64_t k = 0; k < classes; ++k) {
    int64_t n = 0;
    for (int64_t blk = 0; blk < num_blocks; ++blk) n += partial_counts[blk * classes + k];
    count_out[k] = n;
    for (int64_t c = 0; c < channels; ++c) {
      class_sum_t sum = 0;
      for (int64_t blk = 0; blk < num_blocks; ++blk) sum += partial_sums[(blk * classes + k) * channels + c];
      finite &= sum - sum == class_sum_t(0);
      out[k * channels + c] =
          static_cast<scalar_t>(ema_class_mean(static_cast<acc_t>(old_data[k * channels + c]), sum, n, keep));
    }
  }
  CPSL_CHECK_VALUE(finite, "update_prototypes: features must be finite at every pixel that is not ignored");
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
