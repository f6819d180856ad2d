// Stage 2 on the CPU: LU with partial pivoting in float64, log|det U|, loss and grad table.
//
// For C <= kFusedMaxClasses each matrix is inverted by the Gauss-Jordan code below, one matrix
// per task (the batched small-matrix case, where a LAPACK call per 10 x 10 matrix costs more than
// the maths); its pivots are those of the LU. Above it each matrix goes to ATen's LU (LAPACK) and
// an LU solve, as docs/contract.md §8 asks, one call per matrix (see lu_loss_lapack).
#include "lu_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../dmi.h"
#include "../dmi_math.h"
#include "vectorize.h"

namespace dmi_ext::cpu {
namespace {

// Row operations of the Gauss-Jordan elimination below. Rows are padded with zeros to a multiple
// of 4 (CP) so that every operation is whole vectors; a column that must be set, not updated, is
// set through a lane mask, never by a scalar store: a scalar store followed by a vector load of
// the same row stalls store forwarding, which cost more than the arithmetic.
struct Lane {
  int64_t chunk;  // first column of the vector holding the column
  v4l mask;       // its lane in that vector
  explicit Lane(int64_t col) : chunk(col / 4 * 4), mask(v4l{0, 1, 2, 3} == (col - col / 4 * 4)) {}
  DMI_INLINE v4d set(int64_t c, v4d v, double value) const {
    return c == chunk ? select(mask, v4d{} + value, v) : v;
  }
};

DMI_INLINE int64_t pivot_search(const double* A, int64_t C, int64_t CP, int64_t k) {
  int64_t p = k;
  double best = std::abs(A[k * CP + k]);
  for (int64_t r = k + 1; r < C; ++r) {
    const double v = std::abs(A[r * CP + k]);
    if (v > best) {
      best = v;
      p = r;
    }
  }
  return p;
}

DMI_INLINE void swap_rows(double* a, double* b, int64_t CP) {
  for (int64_t c = 0; c < CP; c += 4) {
    const v4d t = load4(a + c);
    store4(a + c, load4(b + c));
    store4(b + c, t);
  }
}

// Pivot row k: divided by the pivot, with 1/pivot in column k.
DMI_INLINE void scale_pivot_row(double* rk, int64_t CP, const Lane& k, double inv) {
  for (int64_t c = 0; c < CP; c += 4) store4(rk + c, k.set(c, load4(rk + c) * inv, inv));
}

// Another row eliminated by pivot row k (already scaled): rr -= f rk, and -f/pivot in column k.
DMI_INLINE void eliminate(double* rr, const double* rk, int64_t CP, const Lane& k, double f,
                          double inv) {
  for (int64_t c = 0; c < CP; c += 4)
    store4(rr + c, k.set(c, load4(rr + c) - f * load4(rk + c), -f * inv));
}

// A <- A^{-1} in place by Gauss-Jordan elimination with partial pivoting. Below the diagonal
// this is exactly LU with partial pivoting, so the pivots are those of A's LU and their log|.|
// sum to log|det A|; eliminating above the diagonal too leaves the inverse. Pivots are taken two
// at a time: the second pivot's column is updated alone, then every other row receives both
// eliminations in one pass, which halves the passes over the matrix (the arithmetic, and so the
// result, is that of one pivot at a time, up to the sign of zeros). kCP > 0 fixes the padded row
// stride at compile time for the common small C. A is scaled so that max|A| is in [1, 2); returns
// false at the first pivot with |pivot| <= tol (the singular rule, dmi_math.h): A is singular and
// left half-eliminated.
//
// With kInverse false it stops at the LU, which is all log|det A| needs (a forward that no
// gradient will follow): only the rows below each pivot and the columns from the pivot on are
// updated, and the pivots, so log|det A| and the singular flag, are bitwise those of the inverse.
template <int64_t kCP, bool kInverse>
DMI_INLINE bool gauss_jordan_impl(double* A, int64_t C, int64_t CP_runtime, double tol,
                                  int64_t* swaps, double* logabsdet) {
  const int64_t CP = kCP > 0 ? kCP : CP_runtime;
  double saved_row[kFusedMaxClasses + 4];
  double lad = 0.0;
  for (int64_t k = 0; k < C;) {
    const int64_t p = pivot_search(A, C, CP, k);
    if (std::abs(A[p * CP + k]) <= tol) return false;
    swaps[k] = p;
    double* rk = A + k * CP;
    if (p != k) swap_rows(rk, A + p * CP, CP);
    const double pivot = rk[k];
    lad += std::log(std::abs(pivot));
    const double inv = 1.0 / pivot;
    const Lane lane_k(k);
    scale_pivot_row(rk, CP, lane_k, inv);
    if (k + 1 == C) {  // the last pivot, alone
      for (int64_t r = 0; r < (kInverse ? C : 0); ++r) {
        const double f = A[r * CP + k];
        if (r != k && f != 0.0) eliminate(A + r * CP, rk, CP, lane_k, f, inv);
      }
      break;
    }
    // Pivot k + 1 among the rows below, on column k + 1 as step k leaves it.
    const int64_t k1 = k + 1;
    const double rk_k1 = rk[k1];
    int64_t p1 = k1;
    double best = -1.0;
    for (int64_t r = k1; r < C; ++r) {
      const double v = std::abs(A[r * CP + k1] - A[r * CP + k] * rk_k1);
      if (v > best) {
        best = v;
        p1 = r;
      }
    }
    double* r1 = A + k1 * CP;
    if (p1 != k1) swap_rows(r1, A + p1 * CP, CP);
    swaps[k1] = p1;
    eliminate(r1, rk, CP, lane_k, r1[k], inv);  // row k + 1 through step k
    const double pivot1 = r1[k1];
    if (std::abs(pivot1) <= tol) return false;
    lad += std::log(std::abs(pivot1));
    const double inv1 = 1.0 / pivot1;
    const Lane lane_k1(k1);
    scale_pivot_row(r1, CP, lane_k1, inv1);
    // Row k as step k left it, column k + 1 zeroed (step k + 1 sets that column itself).
    for (int64_t c = 0; c < CP; c += 4) store4(saved_row + c, lane_k1.set(c, load4(rk + c), 0.0));
    if (kInverse) eliminate(rk, r1, CP, lane_k1, rk_k1, inv1);  // row k through step k + 1
    const int64_t c0 = kInverse ? 0 : k / 4 * 4;  // the LU alone never reads columns left of k
    for (int64_t r = kInverse ? 0 : k1 + 1; r < C; ++r) {
      if (r == k || r == k1) continue;
      double* rr = A + r * CP;
      const double f = rr[k];
      const double f1 = rr[k1] - f * rk_k1;  // column k + 1 after step k
      if (f == 0.0 && f1 == 0.0) continue;
      // The lane masks only in the one or two vectors that hold columns k and k + 1: per vector
      // they cost as much as the arithmetic (issue 23). The same operations, in the same order.
      for (int64_t c = c0; c < lane_k.chunk; c += 4)
        store4(rr + c, load4(rr + c) - f * load4(saved_row + c) - f1 * load4(r1 + c));
      for (int64_t c = lane_k.chunk; c <= lane_k1.chunk; c += 4) {
        const v4d v = lane_k1.set(c, lane_k.set(c, load4(rr + c), 0.0), 0.0);
        store4(rr + c, v - f * load4(saved_row + c) - f1 * load4(r1 + c));
      }
      for (int64_t c = lane_k1.chunk + 4; c < CP; c += 4)
        store4(rr + c, load4(rr + c) - f * load4(saved_row + c) - f1 * load4(r1 + c));
    }
    k += 2;
  }
  // The rows were swapped as they were eliminated: the inverse's columns swap back, last first.
  for (int64_t k = kInverse ? C - 1 : -1; k >= 0; --k) {
    if (swaps[k] == k) continue;
    for (int64_t r = 0; r < C; ++r) std::swap(A[r * CP + k], A[r * CP + swaps[k]]);
  }
  *logabsdet = lad;
  return true;
}

template <bool kInverse>
DMI_INLINE bool gauss_jordan(double* A, int64_t C, int64_t CP, double tol, int64_t* swaps,
                             double* logabsdet) {
  switch (CP) {
    case 4: return gauss_jordan_impl<4, kInverse>(A, C, CP, tol, swaps, logabsdet);
    case 8: return gauss_jordan_impl<8, kInverse>(A, C, CP, tol, swaps, logabsdet);
    case 12: return gauss_jordan_impl<12, kInverse>(A, C, CP, tol, swaps, logabsdet);
    case 16: return gauss_jordan_impl<16, kInverse>(A, C, CP, tol, swaps, logabsdet);
    default: return gauss_jordan_impl<0, kInverse>(A, C, CP, tol, swaps, logabsdet);
  }
}

DMI_CPU_CLONES bool gauss_jordan_inverse(double* A, int64_t C, int64_t CP, double tol,
                                         int64_t* swaps, double* logabsdet) {
  return gauss_jordan<true>(A, C, CP, tol, swaps, logabsdet);
}

DMI_CPU_CLONES bool lu_pivots(double* A, int64_t C, int64_t CP, double tol, int64_t* swaps,
                              double* logabsdet) {
  return gauss_jordan<false>(A, C, CP, tol, swaps, logabsdet);
}

// The equilibration of the singular rule (dmi_math.h): U = s * sums with row t divided by 2^r[t],
// then column k by 2^c[k], each power of two putting that row's (then column's) largest entry in
// [1, 2). Powers of two keep A = R U S exact and keep singularity and rank as they are; the rule's
// pivot tolerance is then relative to every row and column's own scale (a rare class, or a class
// predicted with subnormal probabilities, is not mistaken for a zero). A is written with row
// stride `stride`; returns sum(r) + sum(c), so log|det U| = log|det A| + that * log 2. NaN entries
// are skipped in the maxima and reach the LU, which passes them on.
struct Equilibrated {
  c10::SmallVector<int, kFusedMaxClasses> r, c;  // on the stack up to the fused limit
  int total = 0;

  // 2^e, the factor times_pow2(x, e) multiplies by, or 0 where times_pow2 takes ldexp instead.
  static double pow2_factor(int e) { return e < -1022 || e > 1023 ? 0.0 : times_pow2(1.0, e); }

  // Row by row, every element times one factor per row and per column, as whole-row loops: the
  // same products times_pow2 forms element by element (ldexp where a factor is out of range), at
  // a fraction of the cost (issue 23: this was a third of the LU stage at C = 100).
  void scale(const double* sums, int64_t C, double s, double* A, int64_t stride) {
    r.assign(C, 0);
    c.assign(C, 0);
    total = 0;
    c10::SmallVector<double, kFusedMaxClasses> colmax(C, 0.0);
    for (int64_t t = 0; t < C; ++t) {
      double* a = A + t * stride;
      const double* u = sums + t * C;
      double m = 0.0;
      for (int64_t k = 0; k < C; ++k) {
        const double v = s * u[k];
        a[k] = v;
        const double av = std::abs(v);
        m = av > m ? av : m;
      }
      r[t] = scale_exponent(m);
      const double p = pow2_factor(-r[t]);
      if (p != 0.0) {
        for (int64_t k = 0; k < C; ++k) a[k] = a[k] * p;
      } else {
        for (int64_t k = 0; k < C; ++k) a[k] = times_pow2(a[k], -r[t]);
      }
      for (int64_t k = 0; k < C; ++k) {
        const double av = std::abs(a[k]);
        colmax[k] = av > colmax[k] ? av : colmax[k];
      }
    }
    c10::SmallVector<double, kFusedMaxClasses> pc(C);
    bool in_range = true;
    for (int64_t k = 0; k < C; ++k) {
      c[k] = scale_exponent(colmax[k]);
      pc[k] = pow2_factor(-c[k]);
      in_range &= pc[k] != 0.0;
    }
    for (int64_t t = 0; t < C; ++t) {
      double* a = A + t * stride;
      if (in_range) {
        for (int64_t k = 0; k < C; ++k) a[k] = c[k] != 0 ? a[k] * pc[k] : a[k];
      } else {
        for (int64_t k = 0; k < C; ++k)
          if (c[k] != 0) a[k] = times_pow2(a[k], -c[k]);
      }
    }
    for (int64_t i = 0; i < C; ++i) total += r[i] + c[i];
  }

  // U^{-1}[k][t] = A^{-1}[k][t] / 2^(c[k] + r[t]).
  double unscale_inverse(double a_inv_kt, int64_t k, int64_t t) const {
    return times_pow2(a_inv_kt, -(c[k] + r[t]));
  }

  // out[t * C + k] = f * U^{-1}[k][t] from A^{-1} (row stride `stride`). Where every exponent is
  // within +-511, 2^-c[k] * 2^-r[t] is exactly 2^-(c[k] + r[t]), so the product of two factors
  // is the factor unscale_inverse multiplies by: the same values without its per-element test.
  void unscale_inverse_transposed(const double* A_inv, int64_t C, int64_t stride, double f,
                                  double* out) const {
    bool small = true;
    for (int64_t i = 0; i < C; ++i) small &= std::abs(r[i]) <= 511 && std::abs(c[i]) <= 511;
    if (!small) {
      for (int64_t t = 0; t < C; ++t)
        for (int64_t k = 0; k < C; ++k)
          out[t * C + k] = f * unscale_inverse(A_inv[k * stride + t], k, t);
      return;
    }
    c10::SmallVector<double, kFusedMaxClasses> pc(C);
    for (int64_t k = 0; k < C; ++k) pc[k] = times_pow2(1.0, -c[k]);
    for (int64_t t = 0; t < C; ++t) {
      const double pr = times_pow2(1.0, -r[t]);
      for (int64_t k = 0; k < C; ++k) out[t * C + k] = f * (A_inv[k * stride + t] * (pc[k] * pr));
    }
  }
};

// The overflow rule of dmi_math.h (table_overflowed): U^-1 beyond float64 gives gradient 0.
void zero_if_overflowed(double* table, int64_t n) {
  int flags = 0;
  for (int64_t e = 0; e < n; ++e) flags |= table_entry_flags(table[e]);
  if (table_overflowed(flags)) std::fill(table, table + n, 0.0);
}

void lu_loss_small(const double* sums, const int64_t* counts, int64_t G, int64_t C,
                   bool normalize, double log_eps, double* loss, double* logabsdet,
                   bool* singular, double* grad_table) {
  const int64_t CC = C * C;
  const int64_t grain = std::max<int64_t>(1, (64 * 64 * 64) / (C * C * C));
  const int64_t CP = (C + 3) / 4 * 4;  // padded row stride of the workspace
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    c10::SmallVector<double, 16 * 16> A(C * CP, 0.0);  // the padding columns stay zero
    c10::SmallVector<int64_t, 32> swaps(C);
    Equilibrated eq;
    for (int64_t g = g0; g < g1; ++g) {
      const double s = joint_scale(counts[g], normalize);
      eq.scale(sums + g * CC, C, s, A.data(), CP);
      double lad = 0.0;
      const bool ok =
          grad_table ? gauss_jordan_inverse(A.data(), C, CP, pivot_tolerance(C), swaps.data(), &lad)
                     : lu_pivots(A.data(), C, CP, pivot_tolerance(C), swaps.data(), &lad);
      double* table = grad_table ? grad_table + g * CC : nullptr;
      if (!ok) {
        lad = -std::numeric_limits<double>::infinity();
        if (table) std::fill(table, table + CC, 0.0);
      } else {
        lad += eq.total * kLn2;
        if (table) {  // table = -w s U^{-T}
          eq.unscale_inverse_transposed(A.data(), C, CP, -det_weight(lad, log_eps) * s, table);
          zero_if_overflowed(table, CC);
        }
      }
      singular[g] = !ok;
      logabsdet[g] = lad;
      loss[g] = loss_from_logabsdet(lad, log_eps);
    }
  });
}

// One LAPACK call per matrix, not a batched call: torch 2.13's MKL batched LU goes wrong
// (DLASWP "parameter 6 was incorrect") once torch.set_num_threads has been called, for matrices
// of a few hundred rows (pytorch/pytorch#141358). Above the fused limit a call per matrix costs
// nothing next to the O(C^3) factorisation.
void lu_loss_lapack(const double* sums, const int64_t* counts, int64_t G, int64_t C,
                    bool normalize, double log_eps, double* loss, double* logabsdet,
                    bool* singular, double* table) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t CC = C * C;
  const at::Tensor eye = at::eye(C, f64);
  const at::Tensor A = at::empty({C, C}, f64);
  Equilibrated eq;
  for (int64_t g = 0; g < G; ++g) {
    const double s = joint_scale(counts[g], normalize);
    eq.scale(sums + g * CC, C, s, A.data_ptr<double>(), C);
    auto [LU, pivots, info] = at::linalg_lu_factor_ex(A, /*pivot=*/true, /*check_errors=*/false);
    const at::Tensor diag = LU.diagonal().abs();
    // info > 0: LAPACK met an exactly zero pivot; else the singular rule on the smallest one.
    const double smallest = diag.min().item<double>();
    const bool sing = info.item<int32_t>() > 0 ||
                      smallest <= pivot_tolerance(C);
    const double l = sing ? -std::numeric_limits<double>::infinity()
                          : diag.log().sum().item<double>() + eq.total * kLn2;
    singular[g] = sing;
    logabsdet[g] = l;
    loss[g] = loss_from_logabsdet(l, log_eps);
    if (!table) continue;
    double* out = table + g * CC;
    if (sing) {
      std::fill(out, out + CC, 0.0);
      continue;
    }
    const at::Tensor inv_t =
        at::linalg_lu_solve(LU, pivots, eye, /*left=*/true, /*adjoint=*/true).contiguous();
    const double f = -det_weight(l, log_eps) * s;
    const double* invp = inv_t.const_data_ptr<double>();  // A^{-T}
    for (int64_t t = 0; t < C; ++t)
      for (int64_t k = 0; k < C; ++k) out[t * C + k] = f * eq.unscale_inverse(invp[t * C + k], k, t);
    zero_if_overflowed(out, CC);
  }
}

}  // namespace

void lu_loss_all(const double* sums, const int64_t* counts, int64_t G, int64_t C, bool normalize,
                 double eps, double* loss, double* logabsdet, bool* singular, double* grad_table) {
  const double log_eps = log_eps_of(eps);
  if (C <= kFusedMaxClasses) {
    lu_loss_small(sums, counts, G, C, normalize, log_eps, loss, logabsdet, singular, grad_table);
  } else {
    lu_loss_lapack(sums, counts, G, C, normalize, log_eps, loss, logabsdet, singular, grad_table);
  }
}

namespace {

LossOutputs lu_loss_cpu(const at::Tensor& sums, const at::Tensor& counts, bool normalize,
                        double eps) {
  check_joint(sums, counts);
  check_eps(eps);
  const int64_t C = sums.size(-1);
  const at::Tensor s = sums.reshape({-1, C, C}).contiguous();
  const at::Tensor n = counts.reshape({-1}).contiguous();
  const int64_t G = s.size(0);
  const auto opts = sums.options();
  at::Tensor loss = at::empty({G}, opts);
  at::Tensor lad = at::empty({G}, opts);
  at::Tensor singular = at::empty({G}, opts.dtype(at::kBool));
  at::Tensor table = at::empty({G, C, C}, opts);
  lu_loss_all(s.const_data_ptr<double>(), n.const_data_ptr<int64_t>(), G, C, normalize, eps,
              loss.data_ptr<double>(), lad.data_ptr<double>(), singular.data_ptr<bool>(),
              table.data_ptr<double>());
  const auto batch = counts.sizes();
  return {loss.view(batch), lad.view(batch), singular.view(batch), table.view(sums.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmi_ext, CPU, m) { m.impl("lu_loss", &lu_loss_cpu); }

}  // namespace dmi_ext::cpu
