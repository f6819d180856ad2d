// A CPU stand-in for the few CUDA device features the dmi_ext kernels use, so their real source
// (csrc/cuda/*.cu, lightly rewritten by run.py) can run on a machine without a GPU: one OS thread
// per CUDA thread, __syncthreads a barrier of the block's threads, warp shuffles an exchange among
// the lanes named by the mask, atomics as std::atomic_ref.
//
// What it enforces, as the driver and the hardware would:
//   - the launch rules: block dimensions (<= 1024 threads, x/y <= 1024, z <= 64), grid dimensions
//     (x <= 2^31 - 1, y and z <= 65535), static + dynamic shared memory <= 48 KB unless the
//     kernel's MaxDynamicSharedMemorySize attribute (never above optin - static) covers the
//     dynamic size, and <= the opt-in limit; the attribute may be set once per kernel and never
//     lowered. A violation aborts with the rule broken (a GPU would answer "invalid argument").
//   - blocks in a shuffled order, several in flight at once, so a protocol between blocks (the
//     last-block ticket) runs with blocks concurrent and finishing in any order;
//   - shared memory per block: every `__shared__` variable (run.py rewrites each declaration) and
//     the dynamic shared memory are fresh, exactly sized allocations per block, filled with 0xA5,
//     so a read of unwritten shared memory shows and AddressSanitizer (run.py builds with it) sees
//     any access past the end.
// The static shared memory a kernel touches is measured per block and must stay within what
// cudaFuncGetAttributes answered (kStaticSmemBound, an upper bound the emulator checks).
//
// It cannot see GPU timing, memory coherence or data races between threads of a block beyond what
// the barriers imply: the sanitizers on a GPU (scripts/gpu_suite.sh) do that.
#pragma once

#include <cuda_runtime.h>  // the host-side types (dim3, cudaStream_t, cudaFuncAttributes)

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <thread>
#include <vector>

namespace emu {

// The emulated device (an H100's limits, few multiprocessors so that a few thousand rows already
// take several blocks per matrix).
constexpr int kMultiprocessors = 4;
constexpr size_t kSmemPerBlock = 48 * 1024;
constexpr size_t kSmemPerBlockOptin = 232448;
constexpr size_t kSmemPerMultiprocessor = 233472;
constexpr size_t kReservedSmemPerBlock = 1024;
constexpr int kMaxThreadsPerMultiprocessor = 2048;
// cudaFuncGetAttributes' sharedSizeBytes for every kernel: an upper bound of the static shared
// memory any dmi_ext kernel declares, checked against what each block touches.
constexpr size_t kStaticSmemBound = 8 * 1024;
// Registers per thread answered by cudaFuncGetAttributes (only the occupancy estimate uses it).
constexpr int kRegisters = 64;
// Blocks in flight at once.
constexpr int kConcurrentBlocks = 3;

[[noreturn]] inline void fail(const char* what, long long a, long long b) {
  std::fprintf(stderr, "emulator: launch rule broken: %s (%lld vs %lld)\n", what, a, b);
  std::fflush(stderr);
  std::abort();
}

// A reusable barrier for the lanes of one warp named by a mask.
struct LaneBarrier {
  std::mutex mu;
  std::condition_variable cv;
  int parties, waiting = 0;
  long generation = 0;
  explicit LaneBarrier(int n) : parties(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu);
    const long gen = generation;
    if (++waiting == parties) {
      waiting = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return generation != gen; });
    }
  }
};

struct AlignedFree {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(16)); }
};
using Bytes = std::unique_ptr<unsigned char[], AlignedFree>;

inline Bytes poisoned_bytes(size_t n) {
  Bytes b(static_cast<unsigned char*>(::operator new[](n == 0 ? 1 : n, std::align_val_t(16))));
  std::memset(b.get(), 0xA5, n == 0 ? 1 : n);
  return b;
}

// Everything one block owns while it runs.
struct Block {
  uint3 idx;
  std::barrier<> barrier;
  Bytes dynamic_smem;
  std::mutex mu;  // statics and lane barriers
  std::map<int, Bytes> statics;
  size_t static_bytes = 0;
  std::map<std::pair<unsigned, unsigned>, std::unique_ptr<LaneBarrier>> lane_barriers;
  std::vector<unsigned long long> shuffle_slots;
  Block(uint3 i, unsigned threads, size_t smem)
      : idx(i), barrier(threads), dynamic_smem(poisoned_bytes(smem)), shuffle_slots(threads) {}
};

inline thread_local uint3 thread_idx;
inline thread_local Block* current_block = nullptr;
inline dim3 block_dim, grid_dim;  // one launch at a time

// A `__shared__ T name;` declaration (run.py rewrites it into this call, one key per
// declaration): the running block's own copy, poisoned when the block first touches it.
template <typename T>
T& shared_var(int key) {
  Block& b = *current_block;
  std::lock_guard<std::mutex> lock(b.mu);
  Bytes& slot = b.statics[key];
  if (!slot) {
    slot = poisoned_bytes(sizeof(T));
    b.static_bytes += sizeof(T);
  }
  return *reinterpret_cast<T*>(slot.get());
}

inline unsigned char* dynamic_shared() { return current_block->dynamic_smem.get(); }

inline LaneBarrier& lane_barrier(unsigned warp, unsigned mask) {
  Block& b = *current_block;
  std::lock_guard<std::mutex> lock(b.mu);
  auto& slot = b.lane_barriers[{warp, mask}];
  if (!slot) slot = std::make_unique<LaneBarrier>(__builtin_popcount(mask));
  return *slot;
}

template <typename T>
T shfl_xor(unsigned mask, T v, int offset) {
  static_assert(sizeof(T) <= 8, "shuffle of 8 bytes at most");
  const unsigned tid = thread_idx.x, warp = tid / 32, lane = tid % 32;
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  if (!((mask >> lane) & 1u)) std::abort();  // a lane outside its own mask: a kernel bug
  LaneBarrier& barrier = lane_barrier(warp, mask);
  auto& slots = current_block->shuffle_slots;
  slots[tid] = bits;
  barrier.arrive_and_wait();
  const unsigned other = (lane ^ static_cast<unsigned>(offset));
  if (!((mask >> other) & 1u)) std::abort();  // reading a lane that is not taking part
  bits = slots[warp * 32 + other];
  barrier.arrive_and_wait();
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

// The kernels' function attributes: MaxDynamicSharedMemorySize per kernel (0: never set).
inline std::mutex attributes_mu;
inline std::map<const void*, size_t> max_dynamic;
inline std::map<const void*, size_t> static_touched;  // the most any block of the kernel touched

inline cudaError_t set_max_dynamic(const void* kernel, size_t bytes) {
  std::lock_guard<std::mutex> lock(attributes_mu);
  if (bytes > kSmemPerBlockOptin - kStaticSmemBound) fail("MaxDynamicSharedMemorySize above optin - static", bytes, kSmemPerBlockOptin - kStaticSmemBound);
  auto it = max_dynamic.find(kernel);
  if (it != max_dynamic.end()) fail("MaxDynamicSharedMemorySize set twice for one kernel", bytes, it->second);
  max_dynamic[kernel] = bytes;
  return cudaSuccess;
}

inline void check_launch(const void* kernel, dim3 grid, dim3 block, size_t smem) {
  const long long threads = 1LL * block.x * block.y * block.z;
  if (threads < 1 || threads > 1024) fail("threads per block", threads, 1024);
  if (block.x > 1024 || block.y > 1024 || block.z > 64) fail("block dimension", std::max({block.x, block.y, block.z}), 1024);
  if (grid.x < 1 || grid.y < 1 || grid.z < 1) fail("empty grid", 0, 1);
  if (grid.x > 2147483647u) fail("gridDim.x", grid.x, 2147483647LL);
  if (grid.y > 65535u) fail("gridDim.y", grid.y, 65535);
  if (grid.z > 65535u) fail("gridDim.z", grid.z, 65535);
  std::lock_guard<std::mutex> lock(attributes_mu);
  if (kStaticSmemBound + smem > kSmemPerBlockOptin) fail("static + dynamic shared memory above optin", kStaticSmemBound + smem, kSmemPerBlockOptin);
  if (kStaticSmemBound + smem > kSmemPerBlock) {
    auto it = max_dynamic.find(kernel);
    const size_t allowed = it == max_dynamic.end() ? 0 : it->second;
    if (smem > allowed) fail("static + dynamic shared memory above 48 KB without the opt-in attribute", smem, allowed);
  }
}

// Runs kernel(args...) over grid x block threads: blocks in a shuffled order, kConcurrentBlocks
// of them in flight at once.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
  const void* key = reinterpret_cast<const void*>(kernel);
  check_launch(key, grid, block, smem);
  grid_dim = grid;
  block_dim = block;
  const unsigned threads = block.x * block.y * block.z;
  const unsigned long long blocks = 1ULL * grid.x * grid.y * grid.z;
  std::vector<unsigned long long> order(blocks);
  for (unsigned long long b = 0; b < blocks; ++b) order[b] = b;
  static std::atomic<unsigned> launches{0};
  std::shuffle(order.begin(), order.end(), std::mt19937(1234u + launches.fetch_add(1)));
  std::atomic<unsigned long long> next{0};
  std::atomic<size_t> most_static{0};
  auto runner = [&] {
    for (unsigned long long n; (n = next.fetch_add(1)) < blocks;) {
      const unsigned long long b = order[n];
      const uint3 idx{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                      static_cast<unsigned>(b / grid.x / grid.y)};
      Block state(idx, threads, smem);
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          thread_idx = {t % block.x, t / block.x % block.y, t / block.x / block.y};
          current_block = &state;
          kernel(args...);
          state.barrier.arrive_and_drop();  // a returned thread no longer holds the others up
          current_block = nullptr;
        });
      }
      for (auto& th : pool) th.join();
      size_t seen = most_static.load();
      while (seen < state.static_bytes && !most_static.compare_exchange_weak(seen, state.static_bytes)) {
      }
    }
  };
  std::vector<std::thread> runners;
  const int in_flight = static_cast<int>(std::min<unsigned long long>(kConcurrentBlocks, blocks));
  for (int r = 0; r < in_flight; ++r) runners.emplace_back(runner);
  for (auto& r : runners) r.join();
  if (most_static > kStaticSmemBound) fail("static shared memory touched above the answered sharedSizeBytes", most_static, kStaticSmemBound);
  std::lock_guard<std::mutex> lock(attributes_mu);
  static_touched[key] = std::max(static_touched[key], most_static.load());
}

}  // namespace emu

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define threadIdx emu::thread_idx
#define blockIdx emu::current_block->idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

inline void __syncthreads() { emu::current_block->barrier.arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int offset) { return emu::shfl_xor(mask, v, offset); }
template <typename T>
T __ldcg(const T* p) { return *p; }
template <typename T>
T __ldg(const T* p) { return *p; }
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof(d));
  return d;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline int atomicOr(int* p, int v) { return std::atomic_ref<int>(*p).fetch_or(v); }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
using std::max;
using std::min;
