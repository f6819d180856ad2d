// Stage 1 on the CPU: the joint matrices U (unnormalised) and kept-row counts of docs/contract.md §3.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>

#include "../dmi.h"

namespace dmi_ext::cpu {

// sums: G * C * C float64 zeros, counts: G int64 zeros (G = layout.matrices()), filled in place.
// Softmax is fused when from_logits; no N x C intermediate is formed. Rows are split into per-task
// partial matrices combined in a fixed order, so the result is bitwise reproducible for a given
// thread count. A label outside [0, C) raises when validate, else fills its matrix with NaN.
// A new CPU tensor, uninitialised, without the dispatcher's round trip through at::empty (the
// CPU kernels allocate their outputs on the CPU only; at N = 128 each dispatched at::empty cost
// about a tenth of a kernel, issue 23).
inline at::Tensor cpu_empty(at::IntArrayRef sizes, at::ScalarType dtype,
                            std::optional<at::MemoryFormat> format = std::nullopt) {
  return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, format);
}

// probs_out, from logits, when not null: the softmax rows as the backward reads them
// (probability_rows), contiguous over input's (slices, N, C), float64 for a float64 input and
// float32 otherwise.
void joint_accumulate(const at::Tensor& input, const at::Tensor& target, const Layout& layout,
                      bool from_logits, int64_t ignore_index, bool validate, double* sums,
                      int64_t* counts, void* probs_out = nullptr);

}  // namespace dmi_ext::cpu
