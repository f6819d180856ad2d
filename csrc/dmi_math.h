// The per-matrix scalar maths of docs/contract.md §3-4, written once for the CPU and CUDA kernels alike:
// loss and gradient weight from log|det U|, and the scale each matrix's gradient gets from the
// incoming gradient under a reduction. Everything here is float64 and branch-only, so a CUDA
// thread and a CPU loop compute bitwise the same numbers.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace dmi_ext {

constexpr double kLn2 = 0.69314718055994530942;

// log(eps), with eps = 0 mapped to -inf (then loss = -log|det U|).
C10_HOST_DEVICE inline double log_eps_of(double eps) {
  return eps > 0.0 ? ::log(eps) : -std::numeric_limits<double>::infinity();
}

// loss = -log(|det U| + eps) = -logaddexp(logabsdet, log eps), without forming det U.
C10_HOST_DEVICE inline double loss_from_logabsdet(double logabsdet, double log_eps) {
  if (logabsdet != logabsdet) return logabsdet;  // NaN in, NaN out
  const double inf = std::numeric_limits<double>::infinity();
  if (logabsdet == -inf && log_eps == -inf) return inf;  // singular with eps = 0
  const double hi = logabsdet > log_eps ? logabsdet : log_eps;
  const double lo = logabsdet > log_eps ? log_eps : logabsdet;
  return -(hi + ::log1p(::exp(lo - hi)));
}

// w = |det U| / (|det U| + eps) = sigmoid(logabsdet - log eps); 1 when eps = 0. It is only used
// for non-singular U (singular U has a zero gradient).
C10_HOST_DEVICE inline double det_weight(double logabsdet, double log_eps) {
  const double d = logabsdet - log_eps;  // +inf when eps = 0
  if (d >= 0.0) return 1.0 / (1.0 + ::exp(-d));
  const double e = ::exp(d);
  return e / (1.0 + e);
}

// The singular rule (docs/contract.md, "Singular matrices"). Before its LU, U is equilibrated by
// powers of two: each row divided by the power of two that puts its largest entry in [1, 2), then
// each column likewise (exact, and it changes neither rank nor singularity; it also keeps
// subnormal or huge U in range). A pivot of the equilibrated matrix with |pivot| <=
// pivot_tolerance(C) counts as zero, and U is singular. U is accumulated in float64, so a U that
// is rank-deficient in exact arithmetic (constant network output, two classes with identical
// predictions, duplicate or proportional rows or columns) leaves pivots of a few float64 ulps
// after elimination, far below this bound, while a regular U is flagged only when its
// equilibrated condition number exceeds about 1e12 / C, where a float64 inverse has no more than
// a few correct digits left anyway. A rare class (a small row) or a class predicted with tiny
// probabilities (a small column) is not mistaken for a zero.
C10_HOST_DEVICE inline double pivot_tolerance(int64_t classes) {
  return static_cast<double>(classes) * 0x1p-44;  // C * 5.7e-14
}

// The power of two 2^e with max_abs * 2^-e in [1, 2) (e = 0 for 0, inf or NaN): the scale of one
// row or column in the equilibration above.
C10_HOST_DEVICE inline int scale_exponent(double max_abs) {
  if (!(max_abs > 0.0) || !(max_abs < std::numeric_limits<double>::infinity())) return 0;
  int e = 0;
  ::frexp(max_abs, &e);  // max_abs = f * 2^e, f in [0.5, 1)
  return e - 1;
}

// x * 2^e, exact unless the result leaves the double range (then rounded as ldexp rounds): the
// scaling of the equilibration above, and its undoing on the inverse. A multiply in the common
// case.
C10_HOST_DEVICE inline double times_pow2(double x, int e) {
  if (e < -1022 || e > 1023) return ::ldexp(x, e);
  const uint64_t bits = static_cast<uint64_t>(e + 1023) << 52;
#if defined(__CUDA_ARCH__)
  const double p = __longlong_as_double(static_cast<long long>(bits));
#else
  double p;
  std::memcpy(&p, &bits, sizeof p);
#endif
  return x * p;
}

// s = 1/n with n kept rows when normalizing (U = s * sums), else 1. No kept rows: U = 0, which
// is singular.
// A regular U whose inverse leaves the float64 range (a class predicted with probabilities below
// ~1e-308: float64 logits ~710 apart) would give a gradient of +-inf and NaN; its gradient is
// defined as 0, as for a singular U (loss and log|det U| stay exact). A table holding NaN (NaN
// input, or a poisoned matrix) is left as it is: NaN in, NaN out. Flags of the table's entries
// are or-ed together, then table_overflowed decides; every LU path applies it.
constexpr int kTableInf = 1, kTableNaN = 2;
C10_HOST_DEVICE inline int table_entry_flags(double v) {
  return v != v ? kTableNaN : (v - v != v - v ? kTableInf : 0);  // NaN; +-inf (inf - inf is NaN)
}
C10_HOST_DEVICE inline bool table_overflowed(int flags) { return flags == kTableInf; }

C10_HOST_DEVICE inline double joint_scale(int64_t kept_rows, bool normalize) {
  if (!normalize) return 1.0;
  return kept_rows > 0 ? 1.0 / static_cast<double>(kept_rows) : 0.0;
}

// How far a row of probabilities may sum from 1 and still pass validation: loose enough for a
// 16-bit softmax, tight enough to catch logits passed with from_logits=False.
C10_HOST_DEVICE inline double probability_tolerance(int element_size) {
  return element_size == 2 ? 1e-2 : 1e-3;
}

// The factor matrix g's gradient table is multiplied by in the backward, given the gradient of
// the op's (possibly reduced) loss output. `grad_loss` is anything indexable: a pointer, or a
// strided view on the device (an expanded gradient has stride 0).
template <typename grad_access>
C10_HOST_DEVICE inline double grad_scale(const grad_access& grad_loss, int64_t g, int64_t matrices,
                                         int64_t reduction) {
  if (reduction == 0) return static_cast<double>(grad_loss[g]);  // per-matrix loss
  const double go = static_cast<double>(grad_loss[0]);
  return reduction == 1 ? go / static_cast<double>(matrices) : go;
}

}  // namespace dmi_ext
