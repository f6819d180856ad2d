// Stage 2 on the CPU: from the joint sums, log|det U| by LU with partial pivoting in float64, the
// loss, the singular flag and the grad table s * dL/dU = -w s U^{-T} of docs/contract.md §4-5.
#pragma once

#include <ATen/core/Tensor.h>

namespace dmi_ext::cpu {

// sums: G x C x C float64 and counts: G int64, contiguous. Writes per-matrix float64 loss and
// logabsdet, singular flags and grad_table (G x C x C float64); grad_table == nullptr skips the
// inverse (log|det U| needs only the LU). Up to kFusedMaxClasses the LU is ours, one matrix per
// task; above it ATen's (LAPACK).
void lu_loss_all(const double* sums, const int64_t* counts, int64_t G, int64_t C, bool normalize,
                 double eps, double* loss, double* logabsdet, bool* singular, double* grad_table);

}  // namespace dmi_ext::cpu
