// Loading row tiles and labels for the CPU stage kernels: input rows of any dtype and strides are
// converted into a small contiguous tile of the accumulation type, labels into int64 codes. Both
// the joint and the backward kernel read their inputs through these, so they agree on what a
// kept, ignored or out-of-range row is.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>

namespace dmi_ext::cpu {

constexpr int64_t kIgnoredLabel = -1;     // target == ignore_index: the row is left out
constexpr int64_t kOutOfRangeLabel = -2;  // target outside [0, C) and not ignore_index

// Rows per tile: a tile of C floats per row stays within L1 next to the matrix being updated.
inline int64_t tile_rows(int64_t C) { return std::clamp<int64_t>(2048 / C, 1, 256); }
// The same, for a task of `rows` rows: no larger than the task (the buffers of a small batch).
inline int64_t tile_rows(int64_t C, int64_t rows) {
  return std::max<int64_t>(1, std::min(tile_rows(C), rows));
}

// A task's scratch buffer of n elements (none for n = 0), left uninitialised: every element a
// kernel uses is written before it is read, and the slack past a tile is only read into vector
// lanes that are masked off. Zero-filling the tiles cost as much as the maths at N = 128.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : data_(n > 0 ? new T[n] : nullptr) {}
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }

 private:
  std::unique_ptr<T[]> data_;
};

// Elements of input a parallel task should have before another thread is worth waking.
constexpr int64_t kGrainElements = 16384;

// tile[i, k] = base[i * row_stride + k * col_stride] for i < rows, k < C.
template <typename scalar_t, typename acc_t>
inline void load_rows(acc_t* tile, const scalar_t* base, int64_t row_stride, int64_t col_stride,
                      int64_t rows, int64_t C) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* src = base + i * row_stride;
    acc_t* dst = tile + i * C;
    if (col_stride == 1) {
      for (int64_t k = 0; k < C; ++k) dst[k] = static_cast<acc_t>(src[k]);
    } else {
      for (int64_t k = 0; k < C; ++k) dst[k] = static_cast<acc_t>(src[k * col_stride]);
    }
  }
}

// Whether rows of logits can be read where they are: already in the accumulation type, packed.
template <typename scalar_t, typename acc_t>
constexpr bool rows_in_place(int64_t row_stride, int64_t col_stride, int64_t C) {
  return std::is_same_v<scalar_t, acc_t> && col_stride == 1 && row_stride == C;
}

// `rows` rows of logits as acc_t: the input itself when rows_in_place, else converted into
// `buffer` (rows * C elements).
template <typename scalar_t, typename acc_t>
inline const acc_t* logit_rows(const scalar_t* base, int64_t row_stride, int64_t col_stride,
                               int64_t rows, int64_t C, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (rows_in_place<scalar_t, acc_t>(row_stride, col_stride, C)) return base;
  }
  load_rows(buffer, base, row_stride, col_stride, rows, C);
  return buffer;
}

// out[i] = the label of row i, kIgnoredLabel or kOutOfRangeLabel. Returns how many rows are kept.
template <typename index_t>
inline int64_t read_labels(int64_t* out, const index_t* base, int64_t stride, int64_t rows,
                           int64_t C, int64_t ignore_index) {
  int64_t kept = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t v = static_cast<int64_t>(base[i * stride]);
    if (v == ignore_index) {
      out[i] = kIgnoredLabel;
    } else if (v >= 0 && v < C) {
      out[i] = v;
      ++kept;
    } else {
      out[i] = kOutOfRangeLabel;
    }
  }
  return kept;
}

}  // namespace dmi_ext::cpu
