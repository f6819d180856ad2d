// Row-wise softmax forward/backward over row-major tiles (see softmax_cpu.h).
//
// Why not at::vec: an extension compiled with the default flags gets at::vec's scalar fallback,
// and Sleef's exp lives inside libtorch with hidden symbols. So exp is a Cephes-style polynomial
// written as straight-line float code that GCC vectorises, and each entry point is cloned for
// AVX2+FMA and for baseline x86-64; the loader picks the clone once (an ifunc), so one .so runs
// on any x86-64 and is fast where AVX2 exists.
#include "softmax_cpu.h"

#include "vectorize.h"

#include <cmath>
#include <cstring>

namespace dmi_ext::cpu {
namespace {

// exp(x) for float x, about 1 ulp, branch-free so that loops over it vectorise. NaN propagates,
// x < -87.34 gives 0 (the smallest normal float is e^-87.34), x > 88 saturates at e^88.
inline float exp_float(float x) {
  constexpr float kLo = -87.33654475f;
  constexpr float kHi = 88.0f;
  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |n| < 2^22, no SSE4.1 needed).
  constexpr float kRound = 12582912.0f;
  float n = (xc * 1.44269504088896341f + kRound) - kRound;
  n = n == n ? n : 0.0f;  // keep the int conversion below defined for NaN lanes
  // r = x - n ln 2 in two parts (Cody-Waite) so r keeps full precision.
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  float result = y * two_n;
  result = x < kLo ? 0.0f : result;
  return x == x ? result : x;
}

inline double exp_any(double x) { return std::exp(x); }
inline float exp_any(float x) { return exp_float(x); }

template <typename T>
inline void softmax_rows_impl(T* x, int64_t rows, int64_t C) {
  for (int64_t i = 0; i < rows; ++i) {
    T* row = x + i * C;
    T m = row[0];
    for (int64_t k = 1; k < C; ++k) m = row[k] > m ? row[k] : m;
    for (int64_t k = 0; k < C; ++k) row[k] -= m;
  }
  const int64_t n = rows * C;
  for (int64_t j = 0; j < n; ++j) x[j] = exp_any(x[j]);
  for (int64_t i = 0; i < rows; ++i) {
    T* row = x + i * C;
    T s = 0;
    for (int64_t k = 0; k < C; ++k) s += row[k];
    const T inv = T(1) / s;
    for (int64_t k = 0; k < C; ++k) row[k] *= inv;
  }
}

template <typename T>
inline void softmax_backward_rows_impl(T* g, const T* p, int64_t rows, int64_t C) {
  for (int64_t i = 0; i < rows; ++i) {
    T* gr = g + i * C;
    const T* pr = p + i * C;
    T dot = 0;
    for (int64_t k = 0; k < C; ++k) dot += gr[k] * pr[k];
    for (int64_t k = 0; k < C; ++k) gr[k] = pr[k] * (gr[k] - dot);
  }
}

template <typename T>
inline int64_t first_non_probability_row_impl(const T* p, int64_t rows, int64_t C, double tol,
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

DMI_CPU_CLONES void softmax_rows(float* x, int64_t rows, int64_t C) {
  softmax_rows_impl(x, rows, C);
}
DMI_CPU_CLONES void softmax_rows(double* x, int64_t rows, int64_t C) {
  softmax_rows_impl(x, rows, C);
}
DMI_CPU_CLONES void softmax_backward_rows(float* g, const float* p, int64_t rows, int64_t C) {
  softmax_backward_rows_impl(g, p, rows, C);
}
DMI_CPU_CLONES void softmax_backward_rows(double* g, const double* p, int64_t rows, int64_t C) {
  softmax_backward_rows_impl(g, p, rows, C);
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
