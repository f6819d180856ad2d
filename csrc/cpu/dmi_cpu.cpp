// The fused forward on the CPU: joint accumulation then the LU stage in one op call, the loss
// reduced and cast. Nothing of size N x C is formed; what the backward needs is the grad table.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../dmi.h"
#include "joint_cpu.h"
#include "lu_cpu.h"

namespace dmi_ext::cpu {
namespace {

LossOutputs dmi_cpu(const at::Tensor& input, const at::Tensor& target, bool from_logits,
                    bool normalize, double eps, int64_t ignore_index, int64_t reduction,
                    bool validate) {
  const Layout L = check_inputs(input, target);
  check_eps(eps);
  check_reduction(reduction);
  const int64_t G = L.matrices(), C = L.classes;
  const auto f64 = input.options().dtype(at::kDouble);
  at::Tensor sums = at::zeros({G, C, C}, f64);
  at::Tensor counts = at::zeros({G}, input.options().dtype(at::kLong));
  joint_accumulate(input, target, L, from_logits, ignore_index, validate, sums, counts);

  at::Tensor loss = at::empty({G}, f64);
  at::Tensor lad = at::empty({G}, f64);
  at::Tensor singular = at::empty({G}, input.options().dtype(at::kBool));
  at::Tensor table = at::empty({G, C, C}, f64);
  lu_loss_all(sums, counts, normalize, eps, loss, lad, singular, table);

  const at::ScalarType dtype = loss_dtype(input.scalar_type());
  const std::vector<int64_t> mshape = matrix_shape(L);
  at::Tensor out;
  if (reduction == kReductionNone) {
    out = loss.to(dtype).view(mshape);
  } else {
    const double* lp = loss.const_data_ptr<double>();
    double total = 0.0;
    for (int64_t g = 0; g < G; ++g) total += lp[g];  // fixed order: bitwise reproducible
    if (reduction == kReductionMean) total /= static_cast<double>(G);
    out = at::scalar_tensor(total, input.options().dtype(dtype));
  }
  return {out, lad.to(dtype).view(mshape), singular.view(mshape), table};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmi_ext, CPU, m) { m.impl("dmi", &dmi_cpu); }

}  // namespace dmi_ext::cpu
