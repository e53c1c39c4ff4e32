// CPU kernel of cpsl_ops::rectify_pseudo_labels (schema: ops/rectify.cpp; math: rectify_math.h).
#include <torch/csrc/stable/library.h>

#include <atomic>
#include <limits>

#include "cpsl_ops/cpu_math.h"
#include "cpsl_ops/cpu_tile.h"
#include "cpsl_ops/layout.h"
#include "cpsl_ops/op_checks.h"
#include "cpsl_ops/rectify_math.h"
#include "cpsl_ops/stable.h"

namespace cpsl_ops {
namespace {

template <typename scalar_t>
void rectify_kernel(const Tensor& soft, const Tensor& logits, double threshold, int64_t ignore_index,
                    const Tensor& labels, const Tensor& confidence) {
  using acc_t = acc_type<scalar_t>;
  const Strided3d<const scalar_t> p(as_batch_channel_pixel(soft));
  const Strided3d<const scalar_t> l(as_batch_channel_pixel(logits));
  int64_t* label_out = data_of<int64_t>(labels);
  scalar_t* confidence_out = data_of<scalar_t>(confidence);
  const int64_t classes = soft.size(1);
  const PixelTiles tiles(labels.size(1) * labels.size(2));
  std::atomic<bool> invalid{false};

  torch::stable::parallel_for(0, labels.size(0) * tiles.per_image, 1, [&](int64_t begin, int64_t end) {
    acc_t max_logit[kPixelTile], best[kPixelTile], total[kPixelTile], best_class[kPixelTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = tiles.image(t), p0 = tiles.first_pixel(t), count = tiles.count(t);
      int valid = 1;
      std::fill(max_logit, max_logit + count, -std::numeric_limits<acc_t>::infinity());
      for (int64_t k = 0; k < classes; ++k)
        for (int64_t j = 0; j < count; ++j) {
          const acc_t logit = static_cast<acc_t>(l(b, k, p0 + j));
          const acc_t probability = static_cast<acc_t>(p(b, k, p0 + j));
          valid &= valid_probability(probability) & (logit - logit == acc_t(0));
          max_logit[j] = logit > max_logit[j] ? logit : max_logit[j];
        }
      if (!valid) invalid = true;
      std::fill(best, best + count, acc_t(-1));
      std::fill(total, total + count, acc_t(0));
      std::fill(best_class, best_class + count, acc_t(0));
      for (int64_t k = 0; k < classes; ++k)
        for (int64_t j = 0; j < count; ++j) {
          const acc_t w = static_cast<acc_t>(p(b, k, p0 + j)) *
                          vector_exp(static_cast<acc_t>(l(b, k, p0 + j)) - max_logit[j]);
          total[j] += w;
          const bool better = w > best[j];  // strict: ties keep the first class, as torch.argmax does
          // Written as an increment rather than a select so that GCC keeps a plain vector store: it
          // turns `x = c ? y : x` into a masked store, which costs AMD cores a third of this kernel.
          best_class[j] += better ? acc_t(k) - best_class[j] : acc_t(0);
          best[j] = better ? w : best[j];
        }
      const int64_t offset = b * tiles.pixels + p0;
      for (int64_t j = 0; j < count; ++j) {
        RectifyAccumulator<acc_t> exact;
        // The fast form's products may have underflowed, or (soft labels near the float range)
        // its sum overflowed: the pixel is redone exactly, in the log domain.
        if (best[j] < rectify_fast_floor<acc_t>() || !(total[j] <= std::numeric_limits<acc_t>::max())) {
          for (int64_t k = 0; k < classes; ++k)
            exact.add(static_cast<acc_t>(p(b, k, p0 + j)), static_cast<acc_t>(l(b, k, p0 + j)), k);
        } else {
          exact.argmax = static_cast<long>(best_class[j]);
          exact.sum = total[j] / best[j];
        }
        confidence_out[offset + j] = static_cast<scalar_t>(exact.confidence());
        label_out[offset + j] = exact.label(static_cast<acc_t>(threshold), ignore_index);
      }
    }
  });
  CPSL_CHECK_VALUE(!invalid, "rectify_pseudo_labels: soft_pseudo_labels must be finite and non-negative and "
                              "prototype_logits finite");
}

std::tuple<Tensor, Tensor> rectify_pseudo_labels_cpu(const Tensor& soft, const Tensor& logits, double threshold,
                                                     int64_t ignore_index) {
  check_rectify_inputs(soft, logits);
  const Tensor labels = empty_on(soft, {soft.size(0), soft.size(2), soft.size(3)}, ScalarType::Long);
  const Tensor confidence = empty_on(soft, {soft.size(0), soft.size(2), soft.size(3)}, soft.scalar_type());
  if (labels.numel() == 0) return {labels, confidence};
  dispatch_floating(soft.scalar_type(), "rectify_pseudo_labels", [&](auto tag) {
    rectify_kernel<decltype(tag)>(soft, logits, threshold, ignore_index, labels, confidence);
  });
  return {labels, confidence};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(cpsl_ops, CPU, m) {
  m.impl("rectify_pseudo_labels", TORCH_BOX(&rectify_pseudo_labels_cpu));
}

}  // namespace cpsl_ops
