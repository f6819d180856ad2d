// Row-wise softmax forward/backward and the row gathers/scatters over row-major tiles (see
// softmax_cpu.h).
//
// Why this shape: rows are short (C = 10 is the common case), so per-row max/sum reductions with
// dependent adds cost more than the exps. The float path therefore subtracts ONE max per tile
// (softmax is shift-invariant), runs a branch-free vector exp over the whole tile as a flat
// array, and only then does per-row sums. A row whose sum underflows (its max lies far below the
// tile's) and any tile holding NaN or +inf is redone exactly, row by row, so results are those of
// a per-row softmax to float rounding.
//
// Why not at::vec: an extension compiled with default flags gets at::vec's scalar fallback, and
// Sleef's exp lives inside libtorch with hidden symbols. The vectors here are GCC/Clang vector
// extensions; DMI_CPU_CLONES compiles each entry point for AVX2+FMA and for baseline x86-64.
#include "softmax_cpu.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "vectorize.h"

namespace dmi_ext::cpu {
namespace {

DMI_INLINE v8f splat(float x) { return v8f{} + x; }
// Lanes < n set (0 <= n <= 8).
DMI_INLINE v8i lanes_below(int64_t n) {
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return lane < static_cast<int32_t>(n);
}
DMI_INLINE float hmax(v8f v) {
  float m = v[0];
  for (int l = 1; l < 8; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// Below this, exp_nonpositive returns 0 (e^-86 is still a normal float, so 2^n never lands in the
// subnormal range where adding n to the exponent field would be wrong).
constexpr float kExpLow = -86.0f;

// exp(x) for x <= 0 or -inf: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-5 minimax polynomial
// (about 1.5 ulp), 2^n added to the exponent field. NaN and +inf are not handled (see above).
DMI_INLINE v8f exp_nonpositive(v8f x) {
  const v8f round = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v8f nr = x * 1.44269504088896341f + round;
  const v8f n = nr - round;
  v8f r = x - n * 0.693359375f;  // ln 2 in two parts (Cody-Waite) keeps r exact
  r = r - n * -2.12194440e-4f;
  v8f y = splat(0.00829249f);
  y = y * r + 0.04189792f;
  y = y * r + 0.166676f;
  y = y * r + 0.4999915f;
  y = y * r + 0.99999972f;
  y = y * r + 1.0f;
  // nr's low mantissa bits hold n (two's complement); shifted into the exponent field they add n
  // to y's exponent. The bits of `round` itself shift out (its low 9 mantissa bits are zero).
  const v8i two_n = (v8i)nr << 23;
  const v8f result = (v8f)((v8i)y + two_n);
  return (v8f)((v8i)result & (x >= kExpLow));
}

// A row's sum below this means its max lies ~39 or more below the tile's: redo it exactly.
constexpr float kTinyRowSum = 1e-17f;
// Up to this many classes, accumulate_rows sums a tile into a float C x C block first (two vector
// FMAs per row instead of float64 conversions), then adds the block into U in float64.
constexpr int64_t kFloatBlockMaxClasses = 32;

DMI_INLINE float hsum(v8f v) {
  v4f lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  const v4f s = lo + hi;
  return (s[0] + s[2]) + (s[1] + s[3]);
}

template <typename T>
DMI_INLINE void softmax_row_exact(const T* x, T* e, T* rinv, int64_t C) {
  T m = x[0];
  for (int64_t k = 1; k < C; ++k) m = x[k] > m ? x[k] : m;
  T s = 0;
  for (int64_t k = 0; k < C; ++k) {
    e[k] = std::exp(x[k] - m);
    s += e[k];
  }
  *rinv = T(1) / s;
}

DMI_INLINE void softmax_rows_float(const float* X, float* E, float* rinv, int64_t rows,
                                   int64_t C) {
  const int64_t n = rows * C, nv = n / 8 * 8, nv4 = n / 32 * 32;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  // Four independent running maxima: one would chain every compare-and-blend on the last.
  v8f m[4] = {splat(-kInf), splat(-kInf), splat(-kInf), splat(-kInf)};
  v8i bad = v8i{};
  for (int64_t j = 0; j < nv4; j += 32) {
    for (int q = 0; q < 4; ++q) {
      const v8f v = load8(X + j + 8 * q);
      m[q] = select(v > m[q], v, m[q]);
      bad |= ~(v < kInf);  // NaN or +inf
    }
  }
  for (int64_t j = nv4; j < nv; j += 8) {
    const v8f v = load8(X + j);
    m[0] = select(v > m[0], v, m[0]);
    bad |= ~(v < kInf);
  }
  m[0] = select(m[1] > m[0], m[1], m[0]);
  m[2] = select(m[3] > m[2], m[3], m[2]);
  float M = hmax(select(m[2] > m[0], m[2], m[0]));
  bool exact = false;
  for (int l = 0; l < 8; ++l) exact |= bad[l] != 0;
  for (int64_t j = nv; j < n; ++j) {
    M = X[j] > M ? X[j] : M;
    exact |= !(X[j] < kInf);  // NaN or +inf
  }
  if (exact || M == -kInf) {
    for (int64_t i = 0; i < rows; ++i) softmax_row_exact(X + i * C, E + i * C, rinv + i, C);
    return;
  }
  const v8f Mv = splat(M);
  for (int64_t j = 0; j < nv; j += 8) store8(E + j, exp_nonpositive(load8(X + j) - Mv));
  for (int64_t j = nv; j < n; ++j) E[j] = std::exp(X[j] - M);
  const int64_t cv = C / 8 * 8;
  const v8i tail = lanes_below(C - cv);
  for (int64_t i = 0; i < rows; ++i) {
    const float* e = E + i * C;
    v8f acc = splat(0.0f);
    for (int64_t k = 0; k < cv; k += 8) acc += load8(e + k);
    if (cv < C) acc += (v8f)((v8i)load8(e + cv) & tail);  // reads into slack, masked off
    rinv[i] = hsum(acc);
  }
  // Reciprocals eight rows at a time (rinv has slack); rows whose sum underflowed are redone.
  v8i tiny = v8i{};
  for (int64_t i = 0; i < rows; i += 8) {
    const v8f s = load8(rinv + i);
    tiny |= ~(s >= kTinyRowSum) & lanes_below(rows - i);
    store8(rinv + i, 1.0f / s);
  }
  bool any_tiny = false;
  for (int l = 0; l < 8; ++l) any_tiny |= tiny[l] != 0;
  if (!any_tiny) return;
  for (int64_t i = 0; i < rows; ++i) {
    if (!(1.0f / rinv[i] >= kTinyRowSum)) softmax_row_exact(X + i * C, E + i * C, rinv + i, C);
  }
}

DMI_INLINE void softmax_backward_rows_float(float* out, const float* const* grow,
                                            const float* E, const float* rinv, int64_t rows,
                                            int64_t C) {
  const int64_t cv = C / 8 * 8;
  const v8i tail = lanes_below(C - cv);
  for (int64_t i = 0; i < rows; ++i) {
    const float* gr = grow[i];
    const float* er = E + i * C;
    float* o = out + i * C;
    const float r = rinv[i];
    v8f acc = splat(0.0f);
    for (int64_t k = 0; k < cv; k += 8) acc += load8(gr + k) * load8(er + k);
    if (cv < C) acc += load8(gr + cv) * (v8f)((v8i)load8(er + cv) & tail);
    const float dot = hsum(acc) * r;
    for (int64_t k = 0; k < cv; k += 8) store8(o + k, load8(er + k) * r * (load8(gr + k) - dot));
    for (int64_t k = cv; k < C; ++k) o[k] = er[k] * r * (gr[k] - dot);
  }
}

template <typename T>
DMI_INLINE void softmax_backward_rows_scalar(T* g, const T* E, const T* rinv, int64_t rows,
                                             int64_t C) {
  for (int64_t i = 0; i < rows; ++i) {
    T* gr = g + i * C;
    const T* er = E + i * C;
    T dot = 0;
    for (int64_t k = 0; k < C; ++k) dot += gr[k] * er[k];
    dot *= rinv[i];
    for (int64_t k = 0; k < C; ++k) gr[k] = er[k] * rinv[i] * (gr[k] - dot);
  }
}

DMI_INLINE void accumulate_rows_float(double* U, const float* p, const float* rinv,
                                      const int64_t* label, int64_t rows, int64_t C) {
  const int64_t cv = C / 8 * 8;
  if (C <= kFloatBlockMaxClasses) {
    const int64_t CP = (C + 7) / 8 * 8;  // padded row stride of the block
    float block[kFloatBlockMaxClasses * kFloatBlockMaxClasses];
    std::fill(block, block + C * CP, 0.0f);
    const v8i tail = lanes_below(C - cv);
    for (int64_t i = 0; i < rows; ++i) {
      if (label[i] < 0) continue;
      float* b = block + label[i] * CP;
      const float* pr = p + i * C;
      const float r = rinv ? rinv[i] : 1.0f;
      for (int64_t k = 0; k < cv; k += 8) store8(b + k, load8(b + k) + load8(pr + k) * r);
      if (cv < C) store8(b + cv, load8(b + cv) + (v8f)((v8i)load8(pr + cv) & tail) * r);
    }
    for (int64_t t = 0; t < C; ++t)
      for (int64_t k = 0; k < C; ++k) U[t * C + k] += static_cast<double>(block[t * CP + k]);
    return;
  }
  const int64_t c4 = C / 4 * 4;
  for (int64_t i = 0; i < rows; ++i) {
    if (label[i] < 0) continue;
    double* u = U + label[i] * C;
    const float* pr = p + i * C;
    const float r = rinv ? rinv[i] : 1.0f;
    for (int64_t k = 0; k < c4; k += 4)
      store4(u + k, load4(u + k) + __builtin_convertvector(load4(pr + k) * r, v4d));
    for (int64_t k = c4; k < C; ++k) u[k] += static_cast<double>(pr[k] * r);
  }
}

template <typename T>
DMI_INLINE int64_t first_non_probability_row_impl(const T* p, int64_t rows, int64_t C, double tol,
                                              double* bad_sum, double* bad_min) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = p + i * C;
    double s = 0.0, lo = 1.0, hi = 0.0;
    for (int64_t k = 0; k < C; ++k) {
      const double v = static_cast<double>(row[k]);
      s += v;
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    if (lo < 0.0 || hi > 1.0 || std::abs(s - 1.0) > tol) {
      *bad_sum = s;
      *bad_min = lo;
      return i;
    }
  }
  return -1;
}

}  // namespace

DMI_CPU_CLONES void softmax_rows(const float* X, float* E, float* rinv, int64_t rows,
                                 int64_t C) {
  softmax_rows_float(X, E, rinv, rows, C);
}
void softmax_rows(const double* X, double* E, double* rinv, int64_t rows, int64_t C) {
  for (int64_t i = 0; i < rows; ++i) softmax_row_exact(X + i * C, E + i * C, rinv + i, C);
}
DMI_CPU_CLONES void softmax_backward_rows(float* out, const float* const* grow, const float* E,
                                          const float* rinv, int64_t rows, int64_t C) {
  softmax_backward_rows_float(out, grow, E, rinv, rows, C);
}
void softmax_backward_rows(double* g, const double* E, const double* rinv, int64_t rows,
                           int64_t C) {
  softmax_backward_rows_scalar(g, E, rinv, rows, C);
}
DMI_CPU_CLONES void accumulate_rows(double* U, const float* p, const float* rinv,
                                    const int64_t* label, int64_t rows, int64_t C) {
  accumulate_rows_float(U, p, rinv, label, rows, C);
}
void accumulate_rows(double* U, const double* p, const double* rinv, const int64_t* label,
                     int64_t rows, int64_t C) {
  for (int64_t i = 0; i < rows; ++i) {
    if (label[i] < 0) continue;
    double* u = U + label[i] * C;
    const double r = rinv ? rinv[i] : 1.0;
    for (int64_t k = 0; k < C; ++k) u[k] += p[i * C + k] * r;
  }
}
void gather_rows(double* g, const double* table, const int64_t* label, double scale,
                 int64_t rows, int64_t C) {
  for (int64_t i = 0; i < rows; ++i) {
    if (label[i] < 0) continue;
    const double* tr = table + label[i] * C;
    for (int64_t k = 0; k < C; ++k) g[i * C + k] += scale * tr[k];
  }
}
int64_t first_non_probability_row(const float* p, int64_t rows, int64_t C, double tol,
                                  double* bad_sum, double* bad_min) {
  return first_non_probability_row_impl(p, rows, C, tol, bad_sum, bad_min);
}
int64_t first_non_probability_row(const double* p, int64_t rows, int64_t C, double tol,
                                  double* bad_sum, double* bad_min) {
  return first_non_probability_row_impl(p, rows, C, tol, bad_sum, bad_min);
}

}  // namespace dmi_ext::cpu
