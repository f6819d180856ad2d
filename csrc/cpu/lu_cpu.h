// Stage 2 on the CPU: from the joint sums, log|det U| by LU with partial pivoting in float64, the
// loss, the singular flag and the grad table s * dL/dU = -w s U^{-T} of SPEC §4-5.
#pragma once

#include <ATen/core/Tensor.h>

namespace dmi_ext::cpu {

// sums (G, C, C) float64 and counts (G,) int64, contiguous. Writes per-matrix float64 loss and
// logabsdet, bool singular, and grad_table (G, C, C) float64, all contiguous and preallocated.
// Up to kFusedMaxClasses the LU is ours, one matrix per task; above it ATen's (LAPACK).
void lu_loss_all(const at::Tensor& sums, const at::Tensor& counts, bool normalize, double eps,
                 at::Tensor& loss, at::Tensor& logabsdet, at::Tensor& singular,
                 at::Tensor& grad_table);

}  // namespace dmi_ext::cpu
