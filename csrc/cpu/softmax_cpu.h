// Row-wise softmax and its backward over small row-major tiles, the arithmetic core that the
// joint and backward CPU kernels share, plus the row gathers/scatters around it. Float tiles take
// a vectorised path (see softmax_cpu.cpp); double tiles use std::exp. Every entry point is
// compiled for AVX2+FMA and for baseline x86-64, picked once at load time.
#pragma once

#include <cstdint>

namespace dmi_ext::cpu {

// Extra elements a tile buffer needs past rows * C: the vector loops may read (never use) them.
constexpr int64_t kTileSlack = 8;

// Softmax as E and a reciprocal per row: P[i, :] = E[i, :] * rinv[i] = softmax(X[i, :]) for
// i < rows. X and E are rows x C, contiguous, and must not alias; E needs kTileSlack extra
// elements. Consumers fold rinv into what they do with the row instead of a separate pass.
// A row holding NaN (or +inf) gives a NaN row, as torch.softmax does.
void softmax_rows(const float* X, float* E, float* rinv, int64_t rows, int64_t C);
void softmax_rows(const double* X, double* E, double* rinv, int64_t rows, int64_t C);

// P[i, :] = E[i, :] * rinv[i]: the probabilities of softmax_rows written out, the same product
// softmax_backward_rows forms (so a backward from saved P gives the bits it gives from E, rinv).
// E is read up to 7 elements past its last row (kTileSlack); P is written only within rows x C.
void probability_rows(float* P, const float* E, const float* rinv, int64_t rows, int64_t C);
void probability_rows(double* P, const double* E, const double* rinv, int64_t rows, int64_t C);

// out[i, :] = p_i * (g_i - <g_i, p_i>) with p_i = E[i, :] * rinv[i] (rinv null: p_i = E[i, :],
// the rows of probability_rows) and g_i = grow[i][0:C]: the gradient w.r.t. the logits given the
// gradient g w.r.t. the probabilities p = softmax. The rows grow[i] are padded to a multiple of 8
// with zeros; out rows are contiguous (stride C). The last row of E is read up to 7 elements
// past its end (never used): E needs kTileSlack extra elements.
void softmax_backward_rows(float* out, const float* const* grow, const float* E,
                           const float* rinv, int64_t rows, int64_t C);
// The same in float64, with g a rows x C tile overwritten by the result.
void softmax_backward_rows(double* g, const double* E, const double* rinv, int64_t rows,
                           int64_t C);

// U[label[i], :] += p[i, :] * (rinv ? rinv[i] : 1), in float64, for rows with label[i] >= 0
// (U is C x C). p needs kTileSlack extra elements.
void accumulate_rows(double* U, const float* p, const float* rinv, const int64_t* label,
                     int64_t rows, int64_t C);
void accumulate_rows(double* U, const double* p, const double* rinv, const int64_t* label,
                     int64_t rows, int64_t C);

// g[i, :] += scale * table[label[i], :] for rows with label[i] >= 0 (table is C x C float64).
void gather_rows(double* g, const double* table, const int64_t* label, double scale,
                 int64_t rows, int64_t C);

// The first row of a rows x C tile that is not a probability vector (an entry below 0 or above
// 1, or a sum off 1 by more than `tol`), or -1. NaN entries pass: they give a NaN loss instead.
int64_t first_non_probability_row(const float* p, int64_t rows, int64_t C, double tol,
                                  double* bad_sum, double* bad_min);
int64_t first_non_probability_row(const double* p, int64_t rows, int64_t C, double tol,
                                  double* bad_sum, double* bad_min);

}  // namespace dmi_ext::cpu
