#pragma once
// Memory for the CPU kernels' large outputs.

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>
#if defined(__linux__)
#include <sys/mman.h>
#endif

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
// same size. This allocator keeps the last freed buffer and hands it out again, as PyTorch's CUDA
// caching allocator does: at most one freed buffer (the newest) stays allocated.
class RecyclingAllocator final : public c10::Allocator {
 public:
  // Never destroyed: outputs that Python frees at exit still find it.
  static RecyclingAllocator& instance() {
    static RecyclingAllocator* const allocator = new RecyclingAllocator();
    return *allocator;
  }

  c10::DataPtr allocate(size_t bytes) override {
    Block* block = take(bytes);
    if (block == nullptr) {
      const size_t capacity = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;  // whole huge pages
      void* data = std::aligned_alloc(kHugePageBytes, capacity);
      if (data == nullptr) throw std::bad_alloc();
      prefer_huge_pages(data, capacity);
      block = new Block{data, capacity};
    }
    return {block->data, block, &RecyclingAllocator::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* destination, const void* source, std::size_t count) const override {
    default_copy_data(destination, source, count);
  }

 private:
  struct Block {
    void* data;
    size_t capacity;
  };

  // The kept block if it holds `bytes` without wasting more than half of itself.
  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (kept_ == nullptr || kept_->capacity < bytes || kept_->capacity / 2 > bytes) return nullptr;
    return std::exchange(kept_, nullptr);
  }

  static void release(void* context) {
    Block* freed = static_cast<Block*>(context);
    RecyclingAllocator& self = instance();
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      std::swap(freed, self.kept_);  // the newest buffer is the likeliest to fit the next call
    }
    if (freed != nullptr) {
      std::free(freed->data);
      delete freed;
    }
  }

  std::mutex mutex_;
  Block* kept_ = nullptr;
};

// at::empty for large outputs of the CPU kernels: contiguous, from the recycling allocator above
// when the tensor has kLargeOutputBytes or more, else from PyTorch's CPU allocator.
inline at::Tensor empty_large_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize() < kLargeOutputBytes)
    return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  return at::detail::empty_generic(sizes, &RecyclingAllocator::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), at::MemoryFormat::Contiguous);
}

}  // namespace cpsl_ops
