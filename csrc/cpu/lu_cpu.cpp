// Stage 2 on the CPU: LU with partial pivoting in float64, log|det U|, loss and grad table.
//
// For C <= kFusedMaxClasses each matrix is factorised by the code below, one matrix per task
// (the batched small-matrix case, where a LAPACK call per 10 x 10 matrix costs more than the
// maths). Above it the matrices go to ATen's batched LU (LAPACK) as SPEC §8 asks.
#include "lu_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../dmi.h"
#include "../dmi_math.h"
#include "vectorize.h"

namespace dmi_ext::cpu {
namespace {

// A <- its LU factors in place (unit L below the diagonal, U on and above), rows pivoted so that
// perm[k] is the original row now at position k. Adds log|pivot| to *logabsdet. Returns false at
// the first pivot that is exactly zero: U is singular (SPEC §5) and the factors are incomplete.
DMI_CPU_CLONES bool lu_factor(double* A, int64_t C, int64_t* perm, double* logabsdet) {
  double lad = 0.0;
  for (int64_t k = 0; k < C; ++k) perm[k] = k;
  for (int64_t k = 0; k < C; ++k) {
    int64_t p = k;
    double best = std::abs(A[k * C + k]);
    for (int64_t r = k + 1; r < C; ++r) {
      const double v = std::abs(A[r * C + k]);
      if (v > best) {
        best = v;
        p = r;
      }
    }
    if (A[p * C + k] == 0.0) return false;
    if (p != k) {
      for (int64_t c = 0; c < C; ++c) std::swap(A[k * C + c], A[p * C + c]);
      std::swap(perm[k], perm[p]);
    }
    const double pivot = A[k * C + k];
    lad += std::log(std::abs(pivot));
    const double* prow = A + k * C;
    for (int64_t r = k + 1; r < C; ++r) {
      double* row = A + r * C;
      const double l = row[k] / pivot;
      row[k] = l;
      if (l == 0.0) continue;
      for (int64_t c = k + 1; c < C; ++c) row[c] -= l * prow[c];
    }
  }
  *logabsdet = lad;
  return true;
}

// Z <- (P^T L U)^{-T} with the rows of the result un-permuted and scaled: out[perm[k], :] =
// scale * Y[k, :], where U^T (L^T Y) = I. Z is C x C workspace.
DMI_CPU_CLONES void lu_inverse_transpose(const double* A, const int64_t* perm, int64_t C,
                                         double scale, double* Z, double* out) {
  // Z = U^{-T}, lower triangular: row k is e_k minus earlier rows, over U[k, k].
  for (int64_t k = 0; k < C; ++k) {
    double* z = Z + k * C;
    for (int64_t c = 0; c < C; ++c) z[c] = 0.0;
    z[k] = 1.0;
    for (int64_t j = 0; j < k; ++j) {
      const double u = A[j * C + k];
      if (u == 0.0) continue;
      const double* zj = Z + j * C;
      for (int64_t c = 0; c <= j; ++c) z[c] -= u * zj[c];
    }
    const double inv = 1.0 / A[k * C + k];
    for (int64_t c = 0; c <= k; ++c) z[c] *= inv;
  }
  // Y = L^{-T} Z in place, from the last row up (L^T is unit upper triangular).
  for (int64_t k = C - 1; k >= 0; --k) {
    double* z = Z + k * C;
    for (int64_t j = k + 1; j < C; ++j) {
      const double l = A[j * C + k];
      if (l == 0.0) continue;
      const double* zj = Z + j * C;
      for (int64_t c = 0; c < C; ++c) z[c] -= l * zj[c];
    }
  }
  for (int64_t k = 0; k < C; ++k) {
    const double* z = Z + k * C;
    double* o = out + perm[k] * C;
    for (int64_t c = 0; c < C; ++c) o[c] = scale * z[c];
  }
}

void lu_loss_small(const double* sums, const int64_t* counts, int64_t G, int64_t C,
                   bool normalize, double log_eps, double* loss, double* logabsdet,
                   bool* singular, double* grad_table) {
  const int64_t CC = C * C;
  const int64_t grain = std::max<int64_t>(1, (64 * 64 * 64) / (C * C * C));
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    std::vector<double> work(2 * CC);
    std::vector<int64_t> perm(C);
    double* A = work.data();
    double* Z = work.data() + CC;
    for (int64_t g = g0; g < g1; ++g) {
      const double s = joint_scale(counts[g], normalize);
      for (int64_t e = 0; e < CC; ++e) A[e] = s * sums[g * CC + e];
      double lad = 0.0;
      const bool ok = lu_factor(A, C, perm.data(), &lad);
      double* table = grad_table + g * CC;
      if (!ok) {
        lad = -std::numeric_limits<double>::infinity();
        std::fill(table, table + CC, 0.0);
      } else {
        lu_inverse_transpose(A, perm.data(), C, -det_weight(lad, log_eps) * s, Z, table);
      }
      singular[g] = !ok;
      logabsdet[g] = lad;
      loss[g] = loss_from_logabsdet(lad, log_eps);
    }
  });
}

void lu_loss_lapack(const at::Tensor& sums, const at::Tensor& counts, bool normalize,
                    double log_eps, double* loss, double* logabsdet, bool* singular,
                    at::Tensor& grad_table) {
  const int64_t G = sums.size(0), C = sums.size(1);
  const int64_t* cnt = counts.const_data_ptr<int64_t>();
  std::vector<double> scale(G);
  for (int64_t g = 0; g < G; ++g) scale[g] = joint_scale(cnt[g], normalize);
  const at::Tensor s = at::tensor(scale, sums.options());
  const at::Tensor A = sums * s.view({G, 1, 1});
  auto [LU, pivots, info] = at::linalg_lu_factor_ex(A, /*pivot=*/true, /*check_errors=*/false);
  const at::Tensor lad = LU.diagonal(0, -2, -1).abs().log().sum(-1).contiguous();
  const at::Tensor eye = at::eye(C, sums.options()).expand({G, C, C});
  const at::Tensor inv_t =
      at::linalg_lu_solve(LU, pivots, eye, /*left=*/true, /*adjoint=*/true).contiguous();
  const int32_t* inf = info.const_data_ptr<int32_t>();
  const double* ladp = lad.const_data_ptr<double>();
  const double* invp = inv_t.const_data_ptr<double>();
  double* table = grad_table.data_ptr<double>();
  const int64_t CC = C * C;
  for (int64_t g = 0; g < G; ++g) {
    const bool sing = inf[g] > 0;  // LAPACK: U(info, info) is exactly zero
    const double l = sing ? -std::numeric_limits<double>::infinity() : ladp[g];
    singular[g] = sing;
    logabsdet[g] = l;
    loss[g] = loss_from_logabsdet(l, log_eps);
    const double f = sing ? 0.0 : -det_weight(l, log_eps) * scale[g];
    for (int64_t e = 0; e < CC; ++e) table[g * CC + e] = sing ? 0.0 : f * invp[g * CC + e];
  }
}

}  // namespace

void lu_loss_all(const at::Tensor& sums, const at::Tensor& counts, bool normalize, double eps,
                 at::Tensor& loss, at::Tensor& logabsdet, at::Tensor& singular,
                 at::Tensor& grad_table) {
  const int64_t G = sums.size(0), C = sums.size(1);
  const double log_eps = log_eps_of(eps);
  if (C <= kFusedMaxClasses) {
    lu_loss_small(sums.const_data_ptr<double>(), counts.const_data_ptr<int64_t>(), G, C,
                  normalize, log_eps, loss.data_ptr<double>(), logabsdet.data_ptr<double>(),
                  singular.data_ptr<bool>(), grad_table.data_ptr<double>());
  } else {
    lu_loss_lapack(sums, counts, normalize, log_eps, loss.data_ptr<double>(),
                   logabsdet.data_ptr<double>(), singular.data_ptr<bool>(), grad_table);
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
  lu_loss_all(s, n, normalize, eps, loss, lad, singular, table);
  const auto batch = counts.sizes();
  return {loss.view(batch), lad.view(batch), singular.view(batch), table.view(sums.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmi_ext, CPU, m) { m.impl("lu_loss", &lu_loss_cpu); }

}  // namespace dmi_ext::cpu
