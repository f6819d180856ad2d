// Shared declarations of the dmi_ext op library: the shape contract of docs/contract.md §2, the argument
// checks of docs/contract.md §7 and the names of the stage kernels that csrc/cpu/ and csrc/cuda/ implement.
//
// The data flow is input -> joint (accumulate U) -> lu (log|det U|, loss, grad table) ->
// backward (gather one row of the grad table per input row). Every device implements the same
// three stages plus the fused forward `dmi` that runs joint and lu in one call.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace dmi_ext {

// Reduction codes, the values of at::Reduction::Reduction.
constexpr int64_t kReductionNone = 0;
constexpr int64_t kReductionMean = 1;
constexpr int64_t kReductionSum = 2;

// Up to this many classes the LU runs inside our own kernels; above it the joint matrices are
// handed to ATen's LU (LAPACK on CPU, cuSOLVER/MAGMA on CUDA).
constexpr int64_t kFusedMaxClasses = 128;

// How the rows of `input` and `target` map onto matrices (docs/contract.md §2). Matrix g = slice * sources + j
// reads input slice `slice` and target row g:
//   (N, C)    + (N,)    -> slices 1, sources 1, single   (one matrix, scalar outputs)
//   (B, N, C) + (B, N)  -> slices B, sources 1           (B independent problems)
//   (N, C)    + (M, N)  -> slices 1, sources M           (M label sources, input read once)
struct Layout {
  int64_t slices;
  int64_t sources;
  int64_t rows;
  int64_t classes;
  bool single;
  int64_t matrices() const { return slices * sources; }
};

// Validates dtypes, devices and shapes; throws an error that names the argument and the value.
Layout check_inputs(const at::Tensor& input, const at::Tensor& target);
void check_eps(double eps);
void check_reduction(int64_t reduction);
void check_joint(const at::Tensor& sums, const at::Tensor& counts);
// All the checks of the fused forward (inputs, eps, reduction) and of the backward op (inputs,
// reduction, grad_loss, grad_table), in the order every device runs them.
Layout check_forward(const at::Tensor& input, const at::Tensor& target, double eps,
                     int64_t reduction);
// `probs`, when defined and not empty, is the forward's saved softmax (see the dmi op below): it
// must have input's shape and be float64 for a float64 input, float32 otherwise.
Layout check_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                      const at::Tensor& target, const at::Tensor& grad_table, int64_t reduction,
                      const std::optional<at::Tensor>& probs);
// Whether a backward was handed the forward's probabilities (defined and not the (0,) placeholder).
bool has_probs(const std::optional<at::Tensor>& probs);

// Element strides of input read as (slices, N, C) and of target read as (matrices, N); a
// dimension the tensor lacks has stride 0. Kernels index raw pointers with these (no views).
struct Strides {
  int64_t input_slice, input_row, input_class;
  int64_t target_matrix, target_row;
};
Strides strides_of(const at::Tensor& input, const at::Tensor& target, const Layout& layout);

// The value errors only a kernel can find (docs/contract.md §7), worded once for every device: a label outside
// [0, C) that is not ignore_index (IndexError), and a row of `input` that is not a probability
// vector when from_logits is false (ValueError). `matrix` and `slice` index the Layout's matrices
// and input slices; `row` is the row within them.
[[noreturn]] void throw_bad_label(const Layout& layout, int64_t matrix, int64_t row, int64_t label,
                                  int64_t ignore_index);
[[noreturn]] void throw_not_probability(const Layout& layout, int64_t slice, int64_t row,
                                        double row_sum, double row_min);

// The dtype of the loss and log|det| outputs: float32 for 16-bit inputs, else the input's dtype.
// It is also the dtype the kernels compute the softmax in, and so that of saved probabilities.
at::ScalarType loss_dtype(at::ScalarType input_dtype);

// Shapes of the per-matrix outputs: () for a single matrix, else (matrices,).
std::vector<int64_t> matrix_shape(const Layout& layout);

// The op schemas (ops.cpp) and the device kernels registered for them:
//   joint(input, target, from_logits, ignore_index, validate) -> (sums, counts)
//       sums: (G, C, C) float64, unnormalised sum of P rows by label; counts: (G,) int64 kept rows.
//       A label outside [0, C) raises when validate, else fills its matrix with NaN.
//   lu_loss(sums, counts, normalize, eps) -> (loss, logabsdet, singular, grad_table)
//       per matrix, float64; grad_table[g] = s_g * dL_g/dU_g = -w_g s_g U_g^{-T} (0 if singular).
//   dmi(input, target, from_logits, normalize, eps, ignore_index, reduction, validate,
//       need_grad_table, save_probs) -> (loss, logabsdet, singular, grad_table, probs):
//       joint + lu_loss fused, loss reduced. probs: with save_probs and from_logits, P = softmax
//       of input as the backward would recompute it (input's shape, float64 for a float64 input,
//       else float32), kept by the autograd kernel so that the backward skips the softmax; a
//       device that would rather recompute (CUDA: the same bytes read either way) and every call
//       without save_probs return an empty (0,) tensor.
//   dmi_backward(grad_loss, input, target, grad_table, from_logits, ignore_index, reduction,
//                probs=None)
//       -> grad_input: dL/dP[i] = sum_g scale_g * grad_table[g][target[g, i]], then softmax'
//       with P from `probs` when given (not empty), else recomputed from input.
using LossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using DmiOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// dmi(input, target, ..., validate, need_grad_table=false, save_probs=false) through the
// dispatcher, as torch.ops.dmi_ext.dmi.default calls it (every dispatch key, autograd included),
// for the Python module's direct binding (python_module.cpp).
DmiOutputs call_dmi(const at::Tensor& input, const at::Tensor& target, bool from_logits,
                     bool normalize, double eps, int64_t ignore_index, int64_t reduction,
                     bool validate);

}  // namespace dmi_ext
