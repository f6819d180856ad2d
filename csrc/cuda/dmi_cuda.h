// Host-side entry points shared by the CUDA op files: the forward launch (joint_cuda.cu), the
// reading of the kernels' error record (dmi_cuda.cu) and the library-LU path for C above the
// fused limit (lu_cuda.cu). The ops themselves are registered per file, paired with csrc/cpu/.
#pragma once

#include <ATen/core/Tensor.h>

#include "../dmi.h"
#include "launch_plan.h"

namespace dmi_ext::cuda {

// The current device's limits, read once per device.
DeviceLimits device_limits();

// A kernel's limits on the current device (cudaFuncGetAttributes), read once per device and
// kernel; that first call also raises the kernel's dynamic shared memory attribute to the most the
// device allows next to its static shared memory (launch_plan.h). Thread-safe; the attribute is
// never lowered, so a plan made from these limits launches whatever ran before, on any thread.
KernelInfo kernel_info(const void* kernel);

struct ForwardOptions {
  bool fused;  // stage 2 (LU, loss, grad table) in the same launch; needs C <= kFusedMaxClasses
  bool from_logits;
  bool validate;  // check probability rows (from_logits = false); labels are always recorded
  int64_t ignore_index;
  bool normalize;  // fused only
  double eps;      // fused only
  int64_t reduction;  // fused only
};

struct ForwardOutputs {
  // (2,) int64 on the device: the first bad label and the first non-probability row, each as
  // the bitwise complement of its flat position (matrix * N + row, slice * N + row), 0 if none.
  // Written by every launch; only meaningful to read when validating.
  at::Tensor errors;
  at::Tensor sums, counts;  // not fused: (G, C, C) float64 unnormalised joint sums, (G,) int64
  at::Tensor loss, logabsdet, singular, grad_table;  // fused: as the dmi op returns them
};

// One kernel launch (plus a memset of its ticket counters and error record when needed) on the
// current stream. No host synchronisation.
ForwardOutputs run_forward(const at::Tensor& input, const at::Tensor& target, const Layout& layout,
                           const ForwardOptions& options);

// Reads the error record of run_forward and raises the CPU op's IndexError / ValueError for the
// first bad label or probability row. This device-to-host read is the one host synchronisation of
// the CUDA ops, and happens only with validate=True.
void raise_recorded_errors(const at::Tensor& errors, const at::Tensor& input,
                           const at::Tensor& target, const Layout& layout, int64_t ignore_index);

// Raises a clear error when validate=True is asked for while the current stream is being captured
// into a CUDA graph (the check would need a host synchronisation, which capture forbids).
void check_validate_allowed(bool validate);

// Stage 2 above the fused limit: ATen's LU (cuSOLVER / cuBLAS / MAGMA) on scale * sums, then one
// small kernel for log|det|, the loss and the grad table. sums (G, C, C) float64 and counts (G,)
// int64, contiguous; returns float64 loss and logabsdet, bool singular, (G, C, C) grad table.
LossOutputs lu_loss_library(const at::Tensor& sums, const at::Tensor& counts, bool normalize,
                            double eps);

}  // namespace dmi_ext::cuda
