// Row-wise softmax and its backward over small row-major tiles, the arithmetic core that the
// joint and backward CPU kernels share. Float tiles use a vectorisable exp; double tiles use
// std::exp. Both are compiled twice (AVX2+FMA and baseline x86-64) and picked at load time.
#pragma once

#include <cstdint>

namespace dmi_ext::cpu {

// x[i, :] <- softmax(x[i, :]) for i < rows; x is rows x C, row-major. NaN rows stay NaN.
void softmax_rows(float* x, int64_t rows, int64_t C);
void softmax_rows(double* x, int64_t rows, int64_t C);

// g[i, :] <- p[i, :] * (g[i, :] - <g[i, :], p[i, :]>): the gradient w.r.t. logits given the
// gradient g w.r.t. the probabilities p = softmax(logits).
void softmax_backward_rows(float* g, const float* p, int64_t rows, int64_t C);
void softmax_backward_rows(double* g, const double* p, int64_t rows, int64_t C);

// The first row of a rows x C tile that is not a probability vector (an entry below 0 or above
// 1, or a sum off 1 by more than `tol`), or -1. NaN entries pass: they give a NaN loss instead.
int64_t first_non_probability_row(const float* p, int64_t rows, int64_t C, double tol,
                                  double* bad_sum, double* bad_min);
int64_t first_non_probability_row(const double* p, int64_t rows, int64_t C, double tol,
                                  double* bad_sum, double* bad_min);

}  // namespace dmi_ext::cpu
