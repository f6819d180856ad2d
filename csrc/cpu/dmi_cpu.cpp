// The fused forward on the CPU: joint accumulation then the LU stage in one op call, the loss
// reduced and cast. What the backward needs is the grad table, and from logits (save_probs, when
// a gradient follows) the softmax rows: the only N x C tensor, written as the rows are summed, so
// that the backward does not compute the softmax again (issue 23).
// Few tensors are allocated: at N = 128 a tensor allocation costs as much as the maths.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../dmi.h"
#include "joint_cpu.h"
#include "lu_cpu.h"

namespace dmi_ext::cpu {
namespace {

template <typename T>
void write_as(const at::Tensor& out, const double* values, int64_t n) {
  T* o = out.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<T>(values[i]);
}

DmiOutputs dmi_cpu(const at::Tensor& input, const at::Tensor& target, bool from_logits,
                   bool normalize, double eps, int64_t ignore_index, int64_t reduction,
                   bool validate, bool need_grad_table, bool save_probs) {
  const Layout L = check_forward(input, target, eps, reduction);
  const int64_t G = L.matrices(), C = L.classes;
  // The workspace through PyTorch's CPU allocator, so that memory profiles see it, but as raw
  // memory: a tensor would cost a dispatched allocation more (issue 23).
  const at::DataPtr sums_memory = c10::GetCPUAllocator()->allocate(G * C * C * sizeof(double));
  double* sums = static_cast<double*>(sums_memory.get());
  std::fill_n(sums, G * C * C, 0.0);
  c10::SmallVector<int64_t, 4> counts(G, 0);
  const bool keep_probs = save_probs && from_logits;
  const at::ScalarType dtype = loss_dtype(input.scalar_type());  // also the softmax's
  at::Tensor probs = keep_probs ? cpu_empty(input.sizes(), dtype, at::MemoryFormat::Contiguous)
                                : cpu_empty({0}, dtype);
  joint_accumulate(input, target, L, from_logits, ignore_index, validate, sums, counts.data(),
                   keep_probs ? probs.data_ptr() : nullptr);

  c10::SmallVector<double, 4> loss(G), lad(G);
  const std::vector<int64_t> mshape = matrix_shape(L);
  at::Tensor singular = cpu_empty(mshape, at::kBool);
  at::Tensor table = cpu_empty({need_grad_table ? G : 0, C, C}, at::kDouble);
  lu_loss_all(sums, counts.data(), G, C, normalize, eps, loss.data(), lad.data(),
              singular.data_ptr<bool>(), need_grad_table ? table.data_ptr<double>() : nullptr);

  at::Tensor out_lad = cpu_empty(mshape, dtype);
  at::Tensor out_loss;
  if (reduction == kReductionNone) {
    out_loss = cpu_empty(mshape, dtype);
  } else {
    double total = 0.0;
    for (int64_t g = 0; g < G; ++g) total += loss[g];  // fixed order: bitwise reproducible
    loss[0] = reduction == kReductionMean ? total / static_cast<double>(G) : total;
    out_loss = cpu_empty({}, dtype);
  }
  if (dtype == at::kDouble) {
    write_as<double>(out_loss, loss.data(), out_loss.numel());
    write_as<double>(out_lad, lad.data(), G);
  } else {
    write_as<float>(out_loss, loss.data(), out_loss.numel());
    write_as<float>(out_lad, lad.data(), G);
  }
  return {out_loss, out_lad, singular, table, probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmi_ext, CPU, m) { m.impl("dmi", &dmi_cpu); }

}  // namespace dmi_ext::cpu
