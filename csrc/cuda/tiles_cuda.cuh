// Loading row tiles and labels for the CUDA stage kernels, and the row-wise softmax over a tile:
// the device counterpart of tiles_cpu.h and softmax_cpu.h. Rows of any dtype and strides are
// converted into a contiguous tile of the accumulation type in shared memory (16-byte loads where
// the rows are contiguous), labels into int codes. The forward and the backward kernel read their
// inputs through these, so they agree on what a kept, ignored or out-of-range row is and compute
// the same softmax.
//
// Reductions inside a row use xor-butterflies over a fixed group of lanes: every lane ends with
// the same, bitwise reproducible value, and no atomics are involved (docs/contract.md §6).
#pragma once

#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "launch_plan.h"

namespace dmi_ext::cuda {

constexpr int kIgnoredLabel = -1;     // target == ignore_index: the row is left out
constexpr int kOutOfRangeLabel = -2;  // target outside [0, C) and not ignore_index

// The first error of each kind, as the smallest flat position: slot = max over writers of ~key,
// 0 meaning none. Integer atomicMax gives the same final value in any order.
__device__ inline void record_first(unsigned long long* slot, int64_t key) {
  atomicMax(slot, ~static_cast<unsigned long long>(key));
}

template <typename scalar_t>
struct InputView {  // input as (slices, rows, classes), any strides
  const scalar_t* data;
  int64_t stride_slice, stride_row, stride_class;
  int64_t rows;
  int classes;
  bool rows_contiguous;  // stride_class == 1 && stride_row == classes
};

template <typename index_t>
struct TargetView {  // target as (matrices, rows), any strides
  const index_t* data;
  int64_t stride_matrix, stride_row;
};

template <typename T, int V>
struct alignas(16) Vec {
  T val[V];
};

// tile[i * C + k] = x[slice, row0 + i, k] for i < nrows, k < C, as acc_t. Every thread of the
// block takes part; the caller synchronises before reading the tile.
template <typename scalar_t, typename acc_t>
__device__ void load_tile(acc_t* __restrict__ tile, const InputView<scalar_t>& x, int64_t slice,
                          int64_t row0, int nrows) {
  const int C = x.classes;
  const int count = nrows * C;
  const scalar_t* __restrict__ base = x.data + slice * x.stride_slice + row0 * x.stride_row;
  if (!x.rows_contiguous) {
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
      const int i = e / C, k = e - i * C;
      tile[e] = static_cast<acc_t>(base[i * x.stride_row + k * x.stride_class]);
    }
    return;
  }
  // Contiguous rows: one flat range. Scalar head up to a 16-byte boundary, 16-byte vectors (four
  // in flight per thread), scalar tail.
  constexpr int V = 16 / sizeof(scalar_t);
  const int misaligned = static_cast<int>((reinterpret_cast<uintptr_t>(base) % 16) / sizeof(scalar_t));
  const int head = min(count, misaligned == 0 ? 0 : V - misaligned);
  const int nvec = (count - head) / V;
  for (int e = threadIdx.x; e < head; e += blockDim.x) tile[e] = static_cast<acc_t>(base[e]);
  const Vec<scalar_t, V>* __restrict__ vbase = reinterpret_cast<const Vec<scalar_t, V>*>(base + head);
  constexpr int kInFlight = 4;
  for (int v0 = threadIdx.x; v0 < nvec; v0 += kInFlight * blockDim.x) {
    Vec<scalar_t, V> w[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int v = v0 + u * blockDim.x;
      if (v < nvec) w[u] = vbase[v];
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int v = v0 + u * blockDim.x;
      if (v < nvec) {
#pragma unroll
        for (int j = 0; j < V; ++j) tile[head + v * V + j] = static_cast<acc_t>(w[u].val[j]);
      }
    }
  }
  for (int e = head + nvec * V + threadIdx.x; e < count; e += blockDim.x) {
    tile[e] = static_cast<acc_t>(base[e]);
  }
}

// out[e] = tile[e] for e < count, as scalar_t: `out` is contiguous. The mirror of load_tile.
template <typename scalar_t, typename acc_t>
__device__ void store_tile(scalar_t* __restrict__ out, const acc_t* __restrict__ tile, int count) {
  constexpr int V = 16 / sizeof(scalar_t);
  const int misaligned = static_cast<int>((reinterpret_cast<uintptr_t>(out) % 16) / sizeof(scalar_t));
  const int head = min(count, misaligned == 0 ? 0 : V - misaligned);
  const int nvec = (count - head) / V;
  for (int e = threadIdx.x; e < head; e += blockDim.x) out[e] = static_cast<scalar_t>(tile[e]);
  Vec<scalar_t, V>* __restrict__ vout = reinterpret_cast<Vec<scalar_t, V>*>(out + head);
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    Vec<scalar_t, V> w;
#pragma unroll
    for (int j = 0; j < V; ++j) w.val[j] = static_cast<scalar_t>(tile[head + v * V + j]);
    vout[v] = w;
  }
  for (int e = head + nvec * V + threadIdx.x; e < count; e += blockDim.x) {
    out[e] = static_cast<scalar_t>(tile[e]);
  }
}

// The sum over the block of every thread's `v`, in a fixed order (butterflies within each warp,
// then over the warps' sums), so bitwise reproducible; valid in the threads of warp 0. Every
// thread of the block calls it, at most once between two barriers (it reuses its shared memory).
__device__ inline double block_sum(double v) {
  __shared__ double warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  return v;
}

// The label code of one target entry: the class, kIgnoredLabel or kOutOfRangeLabel.
template <typename index_t>
__device__ inline int label_code(index_t raw, int C, int64_t ignore_index) {
  const int64_t v = static_cast<int64_t>(raw);
  if (v == ignore_index) return kIgnoredLabel;
  return (v >= 0 && v < C) ? static_cast<int>(v) : kOutOfRangeLabel;
}

// A group of `lanes` consecutive lanes of one warp (lanes a power of two, aligned).
struct LaneGroup {
  int lanes;      // lanes per row
  int lane;       // this thread's index within the group
  unsigned mask;  // the group's lanes within the warp

  __device__ static LaneGroup of_thread(int lanes) {
    const int warp_lane = threadIdx.x & 31;
    const unsigned mask =
        lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u) << (warp_lane & ~(lanes - 1));
    return {lanes, warp_lane & (lanes - 1), mask};
  }

  template <typename T>
  __device__ T sum(T v) const {
    for (int off = lanes / 2; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off);
    return v;
  }
  template <typename T>
  __device__ T max(T v) const {  // NaN is not propagated here; the sum that follows carries it
    for (int off = lanes / 2; off > 0; off >>= 1) {
      const T o = __shfl_xor_sync(mask, v, off);
      v = o > v ? o : v;
    }
    return v;
  }
  template <typename T>
  __device__ T min(T v) const {
    for (int off = lanes / 2; off > 0; off >>= 1) {
      const T o = __shfl_xor_sync(mask, v, off);
      v = o < v ? o : v;
    }
    return v;
  }
};

__device__ inline float exp_of(float x) { return expf(x); }
__device__ inline double exp_of(double x) { return exp(x); }

// row[k] <- exp(row[k] - max) for this lane's columns; returns the row's sum of them (all lanes
// of the group get the same value). The first half of a softmax; the caller scales by 1 / sum.
template <typename acc_t>
__device__ inline acc_t exp_shifted_row(acc_t* row, int C, const LaneGroup& lg) {
  acc_t m = -INFINITY;
  for (int k = lg.lane; k < C; k += lg.lanes) m = row[k] > m ? row[k] : m;
  m = lg.max(m);
  acc_t s = 0;
  for (int k = lg.lane; k < C; k += lg.lanes) {
    const acc_t e = exp_of(row[k] - m);
    row[k] = e;
    s += e;
  }
  return lg.sum(s);
}

// row <- softmax(row), in place, by the lanes of one group. NaN rows stay NaN.
template <typename acc_t>
__device__ inline void softmax_row(acc_t* row, int C, const LaneGroup& lg) {
  const acc_t inv = acc_t(1) / exp_shifted_row(row, C, lg);
  for (int k = lg.lane; k < C; k += lg.lanes) row[k] *= inv;
}

// Whether a row passes as a probability vector (entries in [0, 1], sum within tol of 1), with
// the comparisons of the CPU check: NaN entries pass and give a NaN loss instead.
template <typename acc_t>
__device__ inline bool is_probability_row(const acc_t* row, int C, double tol, const LaneGroup& lg) {
  double s = 0.0, lo = 1.0, hi = 0.0;
  for (int k = lg.lane; k < C; k += lg.lanes) {
    const double v = static_cast<double>(row[k]);
    s += v;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  s = lg.sum(s);
  lo = lg.min(lo);
  hi = lg.max(hi);
  return !(lo < 0.0 || hi > 1.0 || fabs(s - 1.0) > tol);
}

}  // namespace dmi_ext::cuda
