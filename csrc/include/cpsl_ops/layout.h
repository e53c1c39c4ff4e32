// Host-side views that let one kernel serve the flat (N, D) and channel-first (B, D, H, W) layouts.
#pragma once
#include <algorithm>

#include "cpsl_ops/stable.h"

namespace cpsl_ops {

// A (B, C, P) view of a flat (N, C) tensor (as (1, C, N)) or of a channel-first (B, C, H, W)
// tensor. No data is copied unless H and W cannot be merged into one strided dimension.
inline Tensor as_batch_channel_pixel(const Tensor& t) {
  if (t.dim() == 2) return torch::stable::unsqueeze(torch::stable::transpose(t, 0, 1), 0);
  CPSL_CHECK(t.dim() == 4, "expected a 2-d (N, C) or 4-d (B, C, H, W) tensor, got ", t.dim(), " dims");
  return torch::stable::reshape(t, {t.size(0), t.size(1), t.size(2) * t.size(3)});
}

// A (B, P) view of flat (N,) or (B, H, W) per-pixel values, matching as_batch_channel_pixel.
inline Tensor as_batch_pixel(const Tensor& t) {
  if (t.dim() == 1) return torch::stable::unsqueeze(t, 0);
  CPSL_CHECK(t.dim() == 3, "expected a 1-d (N,) or 3-d (B, H, W) tensor, got ", t.dim(), " dims");
  return torch::stable::reshape(t, {t.size(0), t.size(1) * t.size(2)});
}

// Fixed-size work blocks, so that reductions merge partial results in an order that does not depend
// on the number of threads: results are bit-identical from run to run and machine to machine.
inline int64_t deterministic_block_size(int64_t total, int64_t min_block, int64_t max_blocks) {
  const int64_t by_count = (total + max_blocks - 1) / max_blocks;
  return std::max(min_block, by_count);
}

}  // namespace cpsl_ops
