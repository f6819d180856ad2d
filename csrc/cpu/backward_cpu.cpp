// Stage 3 on the CPU: one pass over the rows that reads input and target once and writes the
// gradient once (SPEC §4). Row i gets sum over its matrices g of scale_g * grad_table[g][t_gi],
// then, from logits, the softmax backward p * (g - <g, p>) with p recomputed from the logits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../dmi.h"
#include "../dmi_math.h"
#include "softmax_cpu.h"
#include "tiles_cpu.h"
#include "vectorize.h"

namespace dmi_ext::cpu {
namespace {

constexpr int64_t kGrainElements = 16384;

// g[i, :] += scale * table[label[i], :] for kept rows; rows with a label out of range get NaN
// (their matrix's table is NaN too: the forward poisoned it).
template <typename acc_t>
inline void gather_rows_impl(acc_t* g, const double* table, const int64_t* label, double scale,
                             int64_t rows, int64_t C) {
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* gr = g + i * C;
    if (label[i] == kOutOfRangeLabel) {
      for (int64_t k = 0; k < C; ++k) gr[k] = std::numeric_limits<acc_t>::quiet_NaN();
      continue;
    }
    if (label[i] < 0) continue;
    const double* tr = table + label[i] * C;
    for (int64_t k = 0; k < C; ++k) gr[k] += static_cast<acc_t>(scale * tr[k]);
  }
}
DMI_CPU_CLONES void gather_rows(float* g, const double* table, const int64_t* label, double scale,
                                int64_t rows, int64_t C) {
  gather_rows_impl(g, table, label, scale, rows, C);
}
DMI_CPU_CLONES void gather_rows(double* g, const double* table, const int64_t* label,
                                double scale, int64_t rows, int64_t C) {
  gather_rows_impl(g, table, label, scale, rows, C);
}

template <typename scalar_t, typename index_t>
void backward_kernel(const std::vector<double>& scales, const at::Tensor& input,
                     const at::Tensor& target, const at::Tensor& grad_table, bool from_logits,
                     int64_t ignore_index, const Layout& L, at::Tensor& grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor x = input_3d(input);
  const at::Tensor t = target_2d(target, L);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const index_t* tp = t.const_data_ptr<index_t>();
  const double* table = grad_table.const_data_ptr<double>();
  scalar_t* out = grad_input.data_ptr<scalar_t>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t ts0 = t.stride(0), ts1 = t.stride(1);
  const int64_t M = L.sources, N = L.rows, C = L.classes, CC = C * C;

  const int64_t grain = std::max<int64_t>(1, kGrainElements / (C * M));
  // Rows of all slices, flattened; each task writes its own rows only (no reduction).
  at::parallel_for(0, L.slices * N, grain, [&](int64_t begin, int64_t end) {
    const int64_t TR = tile_rows(C);
    std::vector<acc_t> g(TR * C), p(from_logits ? TR * C : 0);
    std::vector<int64_t> labels(TR);
    for (int64_t flat = begin; flat < end;) {
      const int64_t s = flat / N, r = flat % N;
      const int64_t nr = std::min({TR, end - flat, N - r});
      std::fill(g.begin(), g.begin() + nr * C, acc_t(0));
      for (int64_t j = 0; j < M; ++j) {
        const int64_t gi = s * M + j;
        read_labels(labels.data(), tp + gi * ts0 + r * ts1, ts1, nr, C, ignore_index);
        gather_rows(g.data(), table + gi * CC, labels.data(), scales[gi], nr, C);
      }
      if (from_logits) {
        load_rows(p.data(), xp + s * xs0 + r * xs1, xs1, xs2, nr, C);
        softmax_rows(p.data(), nr, C);
        softmax_backward_rows(g.data(), p.data(), nr, C);
      }
      scalar_t* o = out + flat * C;
      for (int64_t e = 0; e < nr * C; ++e) o[e] = static_cast<scalar_t>(g[e]);
      flat += nr;
    }
  });
}

at::Tensor dmi_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                            const at::Tensor& target, const at::Tensor& grad_table,
                            bool from_logits, int64_t ignore_index, int64_t reduction) {
  const Layout L = check_inputs(input, target);
  check_reduction(reduction);
  check_backward(grad_loss, grad_table, L, reduction);
  const int64_t G = L.matrices();
  std::vector<double> scales(G);
  const at::Tensor go = grad_loss.contiguous();
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "dmi_ext_grad_scale", [&] {
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    for (int64_t g = 0; g < G; ++g) scales[g] = grad_scale(gp, g, G, reduction);
  });
  const at::Tensor table = grad_table.contiguous();
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "dmi_ext_backward_cpu", [&] {
        if (target.scalar_type() == at::kLong) {
          backward_kernel<scalar_t, int64_t>(scales, input, target, table, from_logits,
                                             ignore_index, L, grad_input);
        } else {
          backward_kernel<scalar_t, int32_t>(scales, input, target, table, from_logits,
                                             ignore_index, L, grad_input);
        }
      });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmi_ext, CPU, m) { m.impl("dmi_backward", &dmi_backward_cpu); }

}  // namespace dmi_ext::cpu
