// Row-wise softmax forward/backward and the row gathers/scatters over row-major tiles (see
// softmax_cpu.h).
//
// Why this shape: rows are short (C = 10 is the common case), so a vector per row would leave most
// lanes idle in the exp, the costly part. The float path therefore runs a branch-free vector exp
// over the whole tile as a flat array, unshifted, and then sums each row: logits within ±64 need
// no max subtracted (every exp is a normal float, no sum can overflow), which is nearly every
// network's output, and skipping the per-row max saves a reduction per row. A row with a logit
// outside that range is redone shifted by its own max; a row holding NaN or +inf, or all -inf,
// with std::exp (NaN, as torch.softmax gives). Which path a row takes depends on that row alone,
// so its probabilities are a function of that row alone, bit for bit, wherever it sits in a tile:
// identical logit rows give identical probability rows, which is what lets a rank-deficient U
// come out exactly rank-deficient (see lu_cpu.cpp).
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
  v4f lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  v4f a = lo > hi ? lo : hi;
  v4f b = __builtin_shufflevector(a, a, 2, 3, 0, 1);
  a = a > b ? a : b;
  b = __builtin_shufflevector(a, a, 1, 0, 3, 2);
  a = a > b ? a : b;
  return a[0];
}

// Below this, exp_nonpositive returns 0: e^-104 is under half the smallest subnormal float.
constexpr float kExpLow = -104.0f;

// exp(x) for x <= 64 or -inf (the shift-free range's positive half included), to under one ulp (mean error 0.27 ulp, bias under 0.02 ulp, measured
// over [-104, 0] against float64 exp), subnormal results included as torch.softmax keeps them:
// x = n ln2 + r with |r| <= ln2/2 (Cody-Waite, so r is exact), e^r = 1 + r + r^2 q(r) with the
// Cephes degree-5 q, then 2^n applied as two normal powers of two 2^(n/2) 2^(n - n/2), so that a
// result in the subnormal range is rounded once, correctly. NaN and +inf are not handled here
// (the caller redoes such tiles exactly).
// The reduction and polynomial of both exps below: y = e^r and n, with x = n ln2 + r.
DMI_INLINE v8f exp_reduced(v8f x, v8f* n_out) {
  const v8f round = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v8f n = (x * 1.44269504088896341f + round) - round;
  v8f r = x - n * 0.693359375f;  // ln 2 in two parts (Cody-Waite) keeps r exact
  r = r - n * -2.12194440e-4f;
  v8f q = splat(1.9875691500e-4f);
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  *n_out = n;
  return q * (r * r) + r + 1.0f;
}

DMI_INLINE v8f exp_nonpositive(v8f x) {
  v8f n;
  const v8f y = exp_reduced(x, &n);
  const v8i ni = __builtin_convertvector(select(x >= kExpLow, n, splat(0.0f)), v8i);
  const v8i n1 = ni >> 1, n2 = ni - n1;  // both >= -76: 2^n1 and 2^n2 are normal floats
  const v8f result = (y * (v8f)((n1 + 127) << 23)) * (v8f)((n2 + 127) << 23);
  return (v8f)((v8i)result & (x >= kExpLow));
}

// Up to this many classes, accumulate_rows sums a tile into a padded float64 C x C block first
// (whole-vector row updates), then adds the block into U.
constexpr int64_t kBlockMaxClasses = 32;

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

// Logits within [-kShiftFree, kShiftFree] need no shift: every exp is a normal float (and a row
// sum stays far below the float maximum for any C up to 10^10), so softmax(x) = exp(x) / sum exp(x)
// is computed from x itself, one flat vector exp over the tile with no per-row reduction first.
constexpr float kShiftFree = 64.0f;

DMI_INLINE v8i in_shift_free_range(v8f v) { return (v >= -kShiftFree) & (v <= kShiftFree); }

// exp_nonpositive for the lanes in the shift-free range (`in_range`), bitwise: there e^x is a
// normal float (2^-93 .. 2^93), y * 2^n is exact in one multiply as in exp_nonpositive's two,
// and no lane needs the flush below kExpLow. Other lanes give a finite value of no meaning, which
// the caller replaces (their rows are redone shifted). Five vector operations fewer per eight
// elements: the exp is most of a softmax, and the backward recomputes the softmax (issue 23).
DMI_INLINE v8f exp_shift_free(v8f x, v8i in_range) {
  v8f n;
  const v8f y = exp_reduced(select(in_range, x, splat(0.0f)), &n);
  const v8i ni = __builtin_convertvector(n, v8i);
  return y * (v8f)((ni + 127) << 23);
}

// rinv[i] = sum of row i of E (C entries; the last partial vector is read whole, masked: E needs
// kTileSlack elements past the tile). One routine for every row, shifted or not.
DMI_INLINE float row_sum(const float* e, int64_t cv, int64_t C, v8i tail) {
  v8f acc = splat(0.0f);
  for (int64_t k = 0; k < cv; k += 8) acc += load8(e + k);
  if (cv < C) acc += (v8f)((v8i)load8(e + cv) & tail);
  return hsum(acc);
}

// One row shifted by its own max into E (e = exp(x - max) in (0, 1]), its sum returned: the path
// of a row with a logit outside the shift-free range. False for a row holding NaN or +inf, or all
// -inf, which the caller computes exactly instead.
DMI_INLINE bool shifted_row(const float* x, float* e, float* sum, int64_t cv, int64_t C,
                            v8i tail) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float m = -kInf;
  for (int64_t k = 0; k < C; ++k) {
    if (!(x[k] < kInf)) return false;  // NaN or +inf
    m = x[k] > m ? x[k] : m;
  }
  if (!(m > -kInf)) return false;  // a row of -inf: NaN, as torch.softmax gives
  const v8f mv = splat(m);
  for (int64_t k = 0; k < cv; k += 8) store8(e + k, exp_nonpositive(load8(x + k) - mv));
  if (cv < C) {
    v8f last = splat(-kInf);
    for (int64_t k = cv; k < C; ++k) last[k - cv] = x[k];
    // Lanes past C land in the next row (rewritten when that row is done) or the slack.
    v8f done = exp_nonpositive(last - mv);
    for (int64_t k = cv; k < C; ++k) e[k] = done[k - cv];
  }
  *sum = row_sum(e, cv, C, tail);
  return true;
}

DMI_INLINE void softmax_rows_float(const float* X, float* E, float* rinv, int64_t rows,
                                   int64_t C) {
  const int64_t cv = C / 8 * 8;
  const v8i tail = lanes_below(C - cv);
  const int64_t n = rows * C, n8 = n / 8 * 8;
  // 1. exp over the flat tile, unshifted, noting whether every logit is in the shift-free range
  // (NaN is not). The tile's last partial vector is gathered: X may be the caller's tensor.
  // A row with a lane outside the range is redone below (shifted, or exactly), so the lanes in
  // the range are all this pass must get right.
  v8i fits = ~v8i{};
  for (int64_t j = 0; j < n8; j += 8) {
    const v8f v = load8(X + j);
    const v8i in_range = in_shift_free_range(v);
    fits &= in_range;
    store8(E + j, exp_shift_free(v, in_range));
  }
  if (n8 < n) {
    v8f v = splat(0.0f);
    for (int64_t j = n8; j < n; ++j) v[j - n8] = X[j];
    const v8i in_range = in_shift_free_range(v);
    fits &= in_range;
    store8(E + n8, exp_shift_free(v, in_range));  // into the slack past n
  }
  bool all_fit = true;
  for (int l = 0; l < 8; ++l) all_fit &= fits[l] != 0;
  // 2. Row sums. A row is shifted by its own max exactly when one of its own logits is outside the
  // range, so a row's probabilities are a function of that row alone, whatever else the tile
  // holds (see the file comment).
  if (all_fit) {
    for (int64_t i = 0; i < rows; ++i) rinv[i] = row_sum(E + i * C, cv, C, tail);
  } else {
    for (int64_t i = 0; i < rows; ++i) {
      const float* x = X + i * C;
      bool row_fits = true;
      for (int64_t k = 0; k < C; ++k) row_fits &= x[k] >= -kShiftFree && x[k] <= kShiftFree;
      if (row_fits) {
        rinv[i] = row_sum(E + i * C, cv, C, tail);
      } else if (!shifted_row(x, E + i * C, rinv + i, cv, C, tail)) {
        // NaN or +inf in the row, or all -inf: its softmax is NaN, as torch.softmax's (the
        // reciprocal below keeps it NaN).
        softmax_row_exact(x, E + i * C, rinv + i, C);
      }
    }
  }
  // 3. Reciprocals, eight rows at a time.
  for (int64_t i = 0; i < rows; i += 8) store8(rinv + i, 1.0f / load8(rinv + i));
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
    const float r = rinv ? rinv[i] : 1.0f;
    // <g, p> with p = e * r formed first: an unshifted e can reach e^64, and g times it alone
    // could leave the float range where g times p cannot.
    const v8f rv = splat(r);
    v8f acc = splat(0.0f);
    for (int64_t k = 0; k < cv; k += 8) acc += load8(gr + k) * (load8(er + k) * rv);
    if (cv < C) acc += load8(gr + cv) * ((v8f)((v8i)load8(er + cv) & tail) * rv);
    const float dot = hsum(acc);
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
    const T r = rinv ? rinv[i] : T(1);
    // p = e * r formed first, as in the float path: the same bits from saved probabilities.
    T dot = 0;
    for (int64_t k = 0; k < C; ++k) dot += gr[k] * (er[k] * r);
    for (int64_t k = 0; k < C; ++k) gr[k] = er[k] * r * (gr[k] - dot);
  }
}

// U gets P's rows in float64: e * rinv is exact in float64 (24 + 24 bits), so the only rounding
// is that of the float64 sums, and identical probability rows add up to exactly count * p for
// any count a tile holds (what makes a rank-deficient U come out singular, see lu_cpu.cpp).
DMI_INLINE void accumulate_rows_float(double* U, const float* p, const float* rinv,
                                      const int64_t* label, int64_t rows, int64_t C) {
  const int64_t c4 = C / 4 * 4;
  if (C <= kBlockMaxClasses) {
    const int64_t CP = (C + 3) / 4 * 4;  // padded row stride of the block
    double block[kBlockMaxClasses * kBlockMaxClasses];
    std::fill(block, block + C * CP, 0.0);
    const v4l lane = {0, 1, 2, 3};
    const v4l tail = lane < (C - c4);
    for (int64_t i = 0; i < rows; ++i) {
      if (label[i] < 0) continue;
      double* b = block + label[i] * CP;
      const float* pr = p + i * C;
      const double r = rinv ? rinv[i] : 1.0;
      for (int64_t k = 0; k < c4; k += 4)
        store4(b + k, load4(b + k) + __builtin_convertvector(load4(pr + k), v4d) * r);
      if (c4 < C)  // reads into the tile's slack, masked off
        store4(b + c4, load4(b + c4) +
                           select(tail, __builtin_convertvector(load4(pr + c4), v4d) * r, v4d{}));
    }
    for (int64_t t = 0; t < C; ++t)
      for (int64_t k = 0; k < C; ++k) U[t * C + k] += block[t * CP + k];
    return;
  }
  for (int64_t i = 0; i < rows; ++i) {
    if (label[i] < 0) continue;
    double* u = U + label[i] * C;
    const float* pr = p + i * C;
    const double r = rinv ? rinv[i] : 1.0;
    for (int64_t k = 0; k < c4; k += 4)
      store4(u + k, load4(u + k) + __builtin_convertvector(load4(pr + k), v4d) * r);
    for (int64_t k = c4; k < C; ++k) u[k] += static_cast<double>(pr[k]) * r;
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
DMI_CPU_CLONES void probability_rows(float* P, const float* E, const float* rinv, int64_t rows,
                                     int64_t C) {
  // Whole vectors per row: a row's last vector spills into the rows after it, which are written
  // later. Only rows whose spill would leave the tile stop at C (P is the caller's past it).
  const int64_t cv = C / 8 * 8, whole = (C + 7) / 8 * 8;
  int64_t i = 0;
  for (; i < rows && i * C + whole <= rows * C; ++i) {
    const float* e = E + i * C;
    float* p = P + i * C;
    const v8f rv = splat(rinv[i]);
    for (int64_t k = 0; k < C; k += 8) store8(p + k, load8(e + k) * rv);
  }
  for (; i < rows; ++i) {
    const float* e = E + i * C;
    float* p = P + i * C;
    const float r = rinv[i];
    for (int64_t k = 0; k < cv; k += 8) store8(p + k, load8(e + k) * splat(r));
    for (int64_t k = cv; k < C; ++k) p[k] = e[k] * r;
  }
}
void probability_rows(double* P, const double* E, const double* rinv, int64_t rows, int64_t C) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < C; ++k) P[i * C + k] = E[i * C + k] * rinv[i];
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
