// The pieces of the CUDA Sinkhorn that both kernel generations use (kernel_generation.h): the
// call's arguments and flags, the phases of a call and their merges, the log prior, the launch
// options and the two launch paths. Passes and kernels: sinkhorn_passes.cuh and
// sinkhorn_kernels.cuh (current), previous/sinkhorn_passes.cuh and previous/sinkhorn_kernels.cuh.
//
// A call runs 2T + 1 phases in order: the column log-sum-exp pass over every chunk of
// kRowsPerChunk rows, then its merge into each class's maximum and first potential, then for each
// later iteration a column-mass pass and its merge, and last the assignment pass. Passes walk the
// chunks; merges fold each (problem, class) pair's chunk partials in a fixed order (a thread per
// pair here, a warp per pair in sinkhorn_passes.cuh). A kernel body runs a range of phases, and
// two launch paths use it:
//   cooperative  one launch of co-resident blocks over every phase, a grid-wide barrier between
//                phases;
//   per pass     one launch per phase (2T + 1 launches), wherever the cooperative one cannot run:
//                a device without the attribute, a launch refused (MPS or green-context SM
//                limits; the error is cleared), or a stream being captured into a CUDA graph.
// A chunk's partials do not depend on which block computed them and there are no atomics, so both
// paths and every grid size give the same bits, and what runs under the simulator (per pass,
// tests/gpusim/) is the cooperative path's arithmetic too.
#pragma once
#include <cooperative_groups.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "cpsl_ops/cuda_launch.cuh"
#include "cpsl_ops/sinkhorn_math.h"
#include "cpsl_ops/sinkhorn_prior.h"

namespace cpsl_ops {
namespace sinkhorn_kernels {

constexpr int kRowsPerChunk = 1024;
// Device-side flags of one call (cuda::DeviceFlags). The phases stop early on the first two, which
// only earlier kernels or phases (behind a grid barrier) write, so every thread of a launch reads
// the same values; kSpreadOverflow is raised by the later passes and only the host reads it.
constexpr int kBadPrior = 0, kNonFiniteScores = 1, kSpreadOverflow = 2, kNumFlags = 3;

// Everything the kernels read or write. Buffers written while a cooperative launch runs are plain
// pointers (no const __restrict__): other blocks write them before a barrier, so reads must not
// go through the read-only cache.
template <typename scalar_t, typename acc_t>
struct SinkhornArgs {
  const scalar_t* __restrict__ scores;
  int64_t batch, samples, classes, batch_stride, row_stride, chunks_per_problem, num_iters;
  acc_t inv_epsilon, log_num_samples;
  const acc_t* __restrict__ log_prior;  // (B, K)
  acc_t* partial_max;                   // (B, chunks, K): per-chunk largest scores
  acc_t* partial_sum;                   // (B, chunks, K): per-chunk sums of exp((S - max)/ε), then masses
  acc_t* class_max;                     // (B, K): M, each class's largest score
  acc_t* potential;                     // (B, K)
  int32_t* flags;                       // kNumFlags
  scalar_t* __restrict__ out;
};

struct ChunkRows {
  int64_t problem, first, last;
};

template <typename Args>
__device__ __forceinline__ ChunkRows chunk_rows(const Args& a, int64_t chunk) {
  const int64_t first = (chunk % a.chunks_per_problem) * kRowsPerChunk;
  return {chunk / a.chunks_per_problem, first, min(a.samples, first + kRowsPerChunk)};
}

// Phase p of a call of T iterations: 0 the column log-sum-exp pass, odd p a merge (p = 1 the
// first), even 0 < p < 2T a column-mass pass, 2T the assignment pass.
__host__ __device__ inline int64_t num_phases(int64_t num_iters) { return 2 * num_iters + 1; }
__host__ __device__ inline bool is_merge(int64_t phase) { return phase % 2 == 1; }

// M and the first potential of one (problem, class) pair, from its chunks' log-sum-exps in order.
template <typename scalar_t, typename acc_t>
__device__ void merge_column_logsumexp(const SinkhornArgs<scalar_t, acc_t>& a, int64_t pair) {
  const int64_t b = pair / a.classes, k = pair % a.classes;
  OnlineLogSumExp<acc_t> merged;
  for (int64_t c = b * a.chunks_per_problem; c < (b + 1) * a.chunks_per_problem; ++c)
    merged.merge(OnlineLogSumExp<acc_t>{a.partial_max[c * a.classes + k], a.partial_sum[c * a.classes + k]},
                 a.inv_epsilon);
  a.class_max[pair] = merged.max;  // the log-sum-exp of x = (S - M)/ε is log(merged.sum)
  a.potential[pair] = initial_class_potential(a.log_prior[pair], std::log(merged.sum));
}

// One more iteration's potential step of a (problem, class) pair, from its chunks' masses in order.
template <typename scalar_t, typename acc_t>
__device__ void merge_column_mass(const SinkhornArgs<scalar_t, acc_t>& a, int64_t pair) {
  const int64_t b = pair / a.classes, k = pair % a.classes;
  acc_t mass = 0;
  for (int64_t c = b * a.chunks_per_problem; c < (b + 1) * a.chunks_per_problem; ++c)
    mass += a.partial_sum[c * a.classes + k];
  a.potential[pair] += class_potential_step(a.log_prior[pair], a.log_num_samples, mass);
}

template <typename scalar_t, typename acc_t>
__device__ void run_merge_phase(const SinkhornArgs<scalar_t, acc_t>& a, int64_t phase) {
  const int64_t pairs = a.batch * a.classes, threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t pair = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pair < pairs; pair += threads) {
    if (phase == 1) {
      merge_column_logsumexp(a, pair);
    } else {
      merge_column_mass(a, pair);
    }
  }
}

// Whether an earlier phase or kernel of this call raised a flag that stops it (the host then
// raises, and the outputs are not used). Flags are read only after whatever wrote them finished
// (an earlier kernel, or an earlier phase behind a grid barrier): the whole grid sees the same
// values, so no block leaves a barrier the others wait at.
template <typename Args>
__device__ __forceinline__ bool stopped(const Args& a, int64_t phase) {
  return a.flags[kBadPrior] || (phase > 0 && a.flags[kNonFiniteScores]);
}

// The body of a kernel: phases [first_phase, end_phase) of the call, each run_phase(phase), with a
// grid-wide barrier between two phases when kCooperative (then the launch must be cooperative).
template <bool kCooperative, typename Args, typename RunPhase>
__device__ __forceinline__ void run_phases(const Args& a, int64_t first_phase, int64_t end_phase,
                                           RunPhase&& run_phase) {
  for (int64_t phase = first_phase; phase < end_phase; ++phase) {
    if constexpr (kCooperative) {
      if (phase > first_phase) cooperative_groups::this_grid().sync();
    }
    if (stopped(a, phase)) return;
    run_phase(phase);
  }
}

// log of each problem's normalized prior; raises kBadPrior on a non-positive or non-finite entry.
template <typename prior_t, typename acc_t>
__global__ void log_prior_kernel(const prior_t* __restrict__ prior, int64_t stride0, int64_t stride1, int64_t batch,
                                 int64_t classes, acc_t* __restrict__ log_prior, int32_t* __restrict__ flags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  if (!normalized_log_prior(prior + b * stride0, stride1, classes, log_prior + b * classes)) flags[kBadPrior] = 1;
}

enum class LaunchPath { kAuto, kCooperative, kPerPass };

struct LaunchOptions {
  LaunchPath path = LaunchPath::kAuto;
  int64_t max_blocks = INT_MAX;  // a cap on the blocks of a pass (each then walks several chunks)
  bool capturing = false;        // the stream is being captured into a CUDA graph: per pass
};

// The op's options: tests select a path and cap the grid with two environment variables, read at
// each call:
//   CPSL_OPS_CUDA_SINKHORN_LAUNCH      auto (default) | cooperative | per_pass
//   CPSL_OPS_CUDA_SINKHORN_MAX_BLOCKS  a positive cap on the blocks of a pass
inline LaunchOptions launch_options_from_environment(bool capturing) {
  LaunchOptions options;
  options.capturing = capturing;
  const char* path = std::getenv("CPSL_OPS_CUDA_SINKHORN_LAUNCH");
  if (path != nullptr && *path != '\0' && std::strcmp(path, "auto") != 0) {
    CPSL_CHECK(std::strcmp(path, "cooperative") == 0 || std::strcmp(path, "per_pass") == 0,
               "CPSL_OPS_CUDA_SINKHORN_LAUNCH must be auto, cooperative or per_pass, got '", path, "'");
    options.path = std::strcmp(path, "cooperative") == 0 ? LaunchPath::kCooperative : LaunchPath::kPerPass;
  }
  const char* blocks = std::getenv("CPSL_OPS_CUDA_SINKHORN_MAX_BLOCKS");
  if (blocks != nullptr && *blocks != '\0') {
    char* end = nullptr;
    const long long value = std::strtoll(blocks, &end, 10);
    CPSL_CHECK(*end == '\0' && value > 0, "CPSL_OPS_CUDA_SINKHORN_MAX_BLOCKS must be a positive integer, got '",
               blocks, "'");
    options.max_blocks = std::min<long long>(value, INT_MAX);
  }
  return options;
}

// One call: B problems of scores (B, N, K) with unit class stride; assignment contiguous (B, N, K).
template <typename scalar_t, typename prior_t>
struct SinkhornProblem {
  const scalar_t* scores;
  int64_t batch, samples, classes, batch_stride, row_stride;
  const prior_t* prior;
  int64_t prior_stride0, prior_stride1;
  double epsilon;
  int64_t num_iters;
  scalar_t* assignment;
  int32_t* flags;  // kNumFlags, zero on entry
};

// A value per (key, device), queried once: device attributes and kernel occupancies cost a driver
// call (and the first query of a kernel loads it), which a call that launches a few microseconds of
// work should not pay each time. Thread-safe; two threads that miss at once both query and store
// the same value.
class PerDeviceMemo {
 public:
  template <typename Query>
  int get(const void* key, int device, Query&& query) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto found = values_.find({key, device});
      if (found != values_.end()) return found->second;
    }
    const int value = query();  // outside the lock: the first query of a kernel loads its module
    const std::lock_guard<std::mutex> lock(mutex_);
    return values_.emplace(std::make_pair(key, device), value).first->second;
  }

 private:
  std::mutex mutex_;
  std::map<std::pair<const void*, int>, int> values_;
};

inline int multiprocessor_count(int device) {
  static PerDeviceMemo memo;
  return memo.get(nullptr, device, [&] { return cuda::device_attribute(device, cudaDevAttrMultiProcessorCount); });
}

inline bool supports_cooperative_launch(int device) {
  static PerDeviceMemo memo;
  return memo.get(nullptr, device, [&] { return cuda::device_attribute(device, cudaDevAttrCooperativeLaunch); }) != 0;
}

// Blocks of `threads` threads of `kernel` that fit on the device at once.
inline int64_t resident_blocks(const void* kernel, int threads, int device) {
  static PerDeviceMemo memo;
  const int per_multiprocessor = memo.get(kernel, device, [&] {
    int blocks = 0;
    CPSL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
    return blocks;
  });
  return static_cast<int64_t>(per_multiprocessor) * multiprocessor_count(device);
}

// Loads a kernel on the device (CUDA loads kernels lazily, at first use), so that the eager
// warm-up before a CUDA-graph capture loads the per-pass kernel, not the capture.
inline void load_kernel(const void* kernel, int device) {
  static PerDeviceMemo memo;
  memo.get(kernel, device, [&] {
    cudaFuncAttributes attributes;
    CPSL_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    return attributes.numRegs;
  });
}

template <typename scalar_t, typename acc_t>
using PhaseKernel = void (*)(SinkhornArgs<scalar_t, acc_t>, int64_t first_phase, int64_t end_phase);

// One kernel body in its two launch forms, and when auto takes the cooperative one.
template <typename scalar_t, typename acc_t>
struct PhaseKernels {
  PhaseKernel<scalar_t, acc_t> cooperative, per_pass;
  int threads;
  int threads_per_merge_pair;  // of a per-pass merge launch
  // Auto launches cooperatively only when every chunk has a resident block: past one wave, the
  // launches of the per-pass path are a small share of the call, and its blocks start as SMs free
  // up instead of each walking a fixed share of the chunks between grid barriers.
  bool cooperative_only_when_resident;
};

// True if the cooperative kernel was launched. A refusal returns false with the error cleared,
// unless this path was required (then it raises).
template <typename scalar_t, typename acc_t>
bool launch_cooperative(SinkhornArgs<scalar_t, acc_t> args, const PhaseKernels<scalar_t, acc_t>& kernels,
                        int64_t grid, bool required, cudaStream_t stream) {
  cudaError_t status = cudaErrorCooperativeLaunchTooLarge;
  if (grid > 0) {
    int64_t first_phase = 0, end_phase = num_phases(args.num_iters);
    void* kernel_args[] = {&args, &first_phase, &end_phase};
    status = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernels.cooperative),
                                         dim3(static_cast<unsigned int>(grid)), dim3(kernels.threads), kernel_args, 0,
                                         stream);
    if (status == cudaSuccess) return true;
    (void)cudaGetLastError();  // a refused launch is also the thread's last error: clear it
  }
  CPSL_CHECK(!required, "balanced_sinkhorn: the cooperative launch was refused (", cudaGetErrorString(status),
             "); CPSL_OPS_CUDA_SINKHORN_LAUNCH=cooperative forbids the per-pass fallback");
  return false;
}

template <typename scalar_t, typename acc_t>
void launch_per_pass(const SinkhornArgs<scalar_t, acc_t>& args, const PhaseKernels<scalar_t, acc_t>& kernels,
                     int64_t pass_grid, cudaStream_t stream) {
  const dim3 merge_grid(static_cast<unsigned int>(
      cuda::blocks_for(args.batch * args.classes * kernels.threads_per_merge_pair, kernels.threads)));
  for (int64_t phase = 0; phase < num_phases(args.num_iters); ++phase) {
    kernels.per_pass<<<is_merge(phase) ? merge_grid : dim3(static_cast<unsigned int>(pass_grid)), kernels.threads, 0,
                       stream>>>(args, phase, phase + 1);
    CPSL_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename acc_t>
void launch_phases(const SinkhornArgs<scalar_t, acc_t>& args, const PhaseKernels<scalar_t, acc_t>& kernels,
                   const LaunchOptions& options, cudaStream_t stream) {
  const int64_t chunks = args.batch * args.chunks_per_problem;
  const int64_t max_grid = std::min(chunks, options.max_blocks);
  const int device = cuda::current_device();
  if (!options.capturing) load_kernel(reinterpret_cast<const void*>(kernels.per_pass), device);
  // Graph capture takes the per-pass path: it records plain kernel nodes on every CUDA version.
  bool cooperative = options.path == LaunchPath::kCooperative ||
                     (options.path == LaunchPath::kAuto && !options.capturing && supports_cooperative_launch(device));
  int64_t resident = 0;
  if (cooperative) {
    resident = resident_blocks(reinterpret_cast<const void*>(kernels.cooperative), kernels.threads, device);
    cooperative = options.path == LaunchPath::kCooperative || !kernels.cooperative_only_when_resident ||
                  chunks <= resident;
  }
  if (cooperative && launch_cooperative(args, kernels, std::min(max_grid, resident),
                                        options.path == LaunchPath::kCooperative, stream))
    return;
  launch_per_pass(args, kernels, max_grid, stream);
}

}  // namespace sinkhorn_kernels
}  // namespace cpsl_ops
