#pragma once
// Memory hints for the CPU kernels' large outputs.

#include <cstddef>
#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace cpsl_ops {

// glibc serves allocations above its mmap threshold (32 MB at most) with a fresh mapping on every
// call, and the first write faults it in 4 KiB at a time: at CPSL's sizes that costs as much as a
// pass over the data. Asking for transparent huge pages before the first touch takes 512 times
// fewer faults where the system allows it (THP mode "madvise" or "always"); elsewhere, and for
// small buffers, this does nothing. Only whole 2 MiB pages inside the buffer are advised.
inline void prefer_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (bytes < 4 * kHugePage) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace cpsl_ops
