// A CPU stand-in for the few CUDA device features the dmi_ext kernels use, so their real source
// (csrc/cuda/*.cu, lightly rewritten by run.py) can run on a machine without a GPU: one OS thread
// per CUDA thread, blocks one after another, __syncthreads a barrier of the block's threads,
// warp shuffles an exchange among the lanes named by the mask, atomics as std::atomic_ref,
// __shared__ as static storage (one block runs at a time, so "static" is "per block").
//
// It checks indexing, bounds (with the address sanitizer), barrier placement that the logic
// depends on, the partial last tile/block and the ticket protocol, but not GPU timing, memory
// coherence or real races: the sanitizers on a GPU (scripts/gpu_suite.sh) do that.
#pragma once

#include <cuda_runtime.h>  // the host-side types (dim3, cudaStream_t) the sources mention

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace emu {

inline thread_local uint3 thread_idx;
inline uint3 block_idx_shared;  // the running block (blocks run one at a time)
inline dim3 block_dim, grid_dim;
inline std::vector<unsigned char> dynamic_smem;
inline std::barrier<>* block_barrier = nullptr;

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
inline std::mutex lane_barriers_mu;
inline std::map<std::pair<unsigned, unsigned>, std::unique_ptr<LaneBarrier>> lane_barriers;
inline std::vector<unsigned long long> shuffle_slots;

inline LaneBarrier& lane_barrier(unsigned warp, unsigned mask) {
  std::lock_guard<std::mutex> lock(lane_barriers_mu);
  auto& slot = lane_barriers[{warp, mask}];
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
  shuffle_slots[tid] = bits;
  barrier.arrive_and_wait();
  const unsigned other = (lane ^ static_cast<unsigned>(offset));
  if (!((mask >> other) & 1u)) std::abort();  // reading a lane that is not taking part
  bits = shuffle_slots[warp * 32 + other];
  barrier.arrive_and_wait();
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

// Runs kernel(args...) over grid x block threads, blocks in order.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
  grid_dim = grid;
  block_dim = block;
  const unsigned threads = block.x * block.y * block.z;
  shuffle_slots.assign(threads, 0);
  for (unsigned b = 0; b < grid.x * grid.y; ++b) {
    block_idx_shared = {b % grid.x, b / grid.x, 0};
    dynamic_smem.assign(smem + 16, 0xA5);  // poisoned: reading unwritten shared memory shows
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([=] {
        thread_idx = {t, 0, 0};
        kernel(args...);
        block_barrier->arrive_and_drop();  // a returned thread no longer holds the others up
      });
    }
    for (auto& th : pool) th.join();
  }
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
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx_shared
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
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
