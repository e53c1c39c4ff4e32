#pragma once
// Memory for the CPU kernels' large outputs.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpsl_ops/stable.h"

namespace cpsl_ops {

constexpr size_t kHugePageBytes = size_t(2) << 20;
// Outputs from this size on come from the recycling allocator below (four huge pages).
constexpr size_t kLargeOutputBytes = 4 * kHugePageBytes;

// glibc serves allocations above its mmap threshold (32 MB at most) with a fresh mapping on every
// call, and the first write faults it in 4 KiB at a time: at CPSL's sizes that costs as much as a
// pass over the data. Asking for transparent huge pages before the first touch takes 512 times
// fewer faults where the system allows it (THP mode "madvise" or "always"); elsewhere, and for
// small buffers, this does nothing. Only whole 2 MiB pages inside the buffer are advised.
inline void prefer_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < kLargeOutputBytes) return;
  constexpr uintptr_t kPageMask = ~uintptr_t(kHugePageBytes - 1);
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePageBytes - 1) & kPageMask;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & kPageMask;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Even with huge pages, the OS zeroes every fresh page of a large output (a seventh of Sinkhorn's
// time at N = 1M), and a training loop frees that output before the next call asks for one of the
// same size. This pool keeps the last freed buffer and hands it out again, as PyTorch's CUDA
// caching allocator does: at most one freed buffer (the newest) stays allocated.
class RecyclingPool {
 public:
  struct Block {
    void* data;
    size_t capacity;
  };

  // Never destroyed: outputs that Python frees at exit still find it.
  static RecyclingPool& instance() {
    static RecyclingPool* const pool = new RecyclingPool();
    return *pool;
  }

  Block* allocate(size_t bytes) {
    if (Block* kept = take(bytes)) return kept;
    const size_t capacity = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;  // whole huge pages
    void* data = std::aligned_alloc(kHugePageBytes, capacity);
    if (data == nullptr) throw std::bad_alloc();
    prefer_huge_pages(data, capacity);
    return new Block{data, capacity};
  }

  void release(Block* freed) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      std::swap(freed, kept_);  // the newest buffer is the likeliest to fit the next call
    }
    if (freed != nullptr) {
      std::free(freed->data);
      delete freed;
    }
  }

 private:
  // The kept block if it holds `bytes` without wasting more than half of itself.
  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (kept_ == nullptr || kept_->capacity < bytes || kept_->capacity / 2 > bytes) return nullptr;
    return std::exchange(kept_, nullptr);
  }

  std::mutex mutex_;
  Block* kept_ = nullptr;
};

// Whether large outputs come from the pool: a tensor over memory of one's own has a storage that
// cannot grow (the stable ABI offers no allocator-backed CPU storage), so `resize_` to more
// elements, or an `out=` of a larger shape, raises on it. CPSL_OPS_RECYCLE_OUTPUTS=0 gives every
// output PyTorch's allocator instead, at the cost of the fresh pages.
inline bool recycling_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("CPSL_OPS_RECYCLE_OUTPUTS");
    return value == nullptr || std::string(value) != "0";
  }();
  return enabled;
}

// An uninitialized contiguous CPU tensor of `like`'s dtype for a large kernel output: from the recycling pool above
// when it has kLargeOutputBytes or more (and recycling is enabled), else from PyTorch's CPU
// allocator. (A tensor over memory of one's own, freed through a deleter, is what needs torch
// 2.11's stable ABI.)
inline Tensor empty_large_output(const Tensor& like, const std::vector<int64_t>& sizes) {
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const ScalarType dtype = like.scalar_type();
  const size_t bytes = static_cast<size_t>(numel) * like.element_size();
  if (bytes < kLargeOutputBytes || !recycling_enabled()) return empty_on(like, sizes, dtype);
  std::vector<int64_t> strides(sizes.size(), 1);
  for (size_t d = sizes.size(); d-- > 1;) strides[d - 1] = strides[d] * sizes[d];
  RecyclingPool::Block* block = RecyclingPool::instance().allocate(bytes);
  return torch::stable::from_blob(block->data, sizes, strides, torch::stable::Device(torch::headeronly::DeviceType::CPU),
                                  dtype, [block](void*) { RecyclingPool::instance().release(block); });
}

}  // namespace cpsl_ops
