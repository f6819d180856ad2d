// Stage 3 on the CPU: one pass over the rows that reads input and target once and writes the
// gradient once (docs/contract.md §4). Row i gets g_i = sum over its matrices g of scale_g *
// grad_table[g][t_gi], then, from logits, the softmax backward p * (g - <g, p>) with p the
// forward's saved probabilities when the autograd kernel kept them (`probs`), else recomputed from
// the logits: the same bits either way (probability_rows).
//
// For 16- and 32-bit inputs (float arithmetic) each task first converts the scaled grad tables
// it needs into float rows padded to a multiple of 8, plus a zero row (ignored labels) and a NaN
// row (labels out of range: their matrix was poisoned in the forward). A row's g_i is then a
// pointer into that table (one label source) or a short vector sum (several), with no per-row
// float64 conversion.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "../dmi.h"
#include "../dmi_math.h"
#include "joint_cpu.h"
#include "softmax_cpu.h"
#include "tiles_cpu.h"

namespace dmi_ext::cpu {
namespace {

// The inputs every backward task reads, unpacked once.
template <typename scalar_t, typename index_t>
struct BackwardArgs {
  const scalar_t* x;
  const index_t* t;
  const double* table;
  const double* scales;
  Strides st;
  Layout L;
  bool from_logits;
  int64_t ignore_index;
  scalar_t* out;
  const void* probs;  // the saved softmax, contiguous, float64 for float64 input else float; or null
};

template <typename scalar_t, typename index_t>
void backward_float(const BackwardArgs<scalar_t, index_t>& a) {
  const int64_t M = a.L.sources, N = a.L.rows, C = a.L.classes, CC = C * C;
  const int64_t CP = (C + 7) / 8 * 8;          // padded row of a float table
  const int64_t table_rows = C + 2;            // C labels, the zero row, the NaN row
  const int64_t zero_row = C, nan_row = C + 1;
  // Float output in packed rows is written in place; other dtypes go through a float tile.
  constexpr bool float_out = std::is_same_v<scalar_t, float>;
  const float* saved = static_cast<const float*>(a.probs);
  const int64_t total_rows = a.L.slices * N;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (C * M));
  at::parallel_for(0, total_rows, grain, [&](int64_t begin, int64_t end) {
    const int64_t TR = tile_rows(C, end - begin);
    const bool in_place = float_out && rows_in_place<scalar_t, float>(a.st.input_row,
                                                                      a.st.input_class, C);
    std::vector<float> tables(M * table_rows * CP);  // zero-filled: the padding is read
    Scratch<float> gsum(M > 1 ? TR * CP : 0);
    Scratch<const float*> grow(TR);
    Scratch<float> loaded(a.from_logits && !in_place ? TR * C + kTileSlack : 0);
    Scratch<float> e(a.from_logits ? TR * C + kTileSlack : 0);
    Scratch<float> rinv(a.from_logits ? TR + kTileSlack : 0);
    Scratch<float> out_tile(float_out ? 0 : TR * C);
    Scratch<int64_t> labels(TR);
    int64_t tables_slice = -1;
    for (int64_t flat = begin; flat < end;) {
      const int64_t s = flat / N, r = flat % N;
      const int64_t nr = std::min({TR, end - flat, N - r});
      if (s != tables_slice) {  // the scaled tables of this slice's matrices, as float rows
        for (int64_t j = 0; j < M; ++j) {
          const int64_t gi = s * M + j;
          float* tf = tables.data() + j * table_rows * CP;
          std::fill(tf, tf + table_rows * CP, 0.0f);
          for (int64_t row = 0; row < C; ++row)
            for (int64_t k = 0; k < C; ++k)
              tf[row * CP + k] = static_cast<float>(a.scales[gi] * a.table[gi * CC + row * C + k]);
          std::fill(tf + nan_row * CP, tf + nan_row * CP + C, std::numeric_limits<float>::quiet_NaN());
        }
        tables_slice = s;
      }
      for (int64_t j = 0; j < M; ++j) {
        const int64_t gi = s * M + j;
        read_labels(labels.data(), a.t + gi * a.st.target_matrix + r * a.st.target_row,
                    a.st.target_row, nr, C, a.ignore_index);
        const float* tf = tables.data() + j * table_rows * CP;
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t row = labels[i] >= 0                          ? labels[i]
                              : labels[i] == kOutOfRangeLabel ? nan_row
                                                                      : zero_row;
          if (M == 1) {
            grow[i] = tf + row * CP;
          } else {
            float* g = gsum.data() + i * CP;
            if (j == 0) std::fill(g, g + CP, 0.0f);
            for (int64_t k = 0; k < CP; ++k) g[k] += tf[row * CP + k];
            grow[i] = g;
          }
        }
      }
      float* o;
      if constexpr (float_out) {
        o = a.out + flat * C;
      } else {
        o = out_tile.data();
      }
      if (a.from_logits && saved != nullptr) {
        const float* p = saved + flat * C;
        if (flat + nr == total_rows) {  // the vector tail of the last row would read past the end
          std::copy(p, p + nr * C, e.data());
          p = e.data();
        }
        softmax_backward_rows(o, grow.data(), p, nullptr, nr, C);
      } else if (a.from_logits) {
        const float* x = logit_rows(a.x + s * a.st.input_slice + r * a.st.input_row,
                                    a.st.input_row, a.st.input_class, nr, C, loaded.data());
        softmax_rows(x, e.data(), rinv.data(), nr, C);
        softmax_backward_rows(o, grow.data(), e.data(), rinv.data(), nr, C);
      } else {
        for (int64_t i = 0; i < nr; ++i) std::copy(grow[i], grow[i] + C, o + i * C);
      }
      if constexpr (!float_out) {
        scalar_t* dst = a.out + flat * C;
        for (int64_t q = 0; q < nr * C; ++q) dst[q] = static_cast<scalar_t>(o[q]);
      }
      flat += nr;
    }
  });
}

// In float64 throughout: float64 input, and 16/32-bit input whose scaled tables leave the float
// range (|U^{-1}| beyond 3.4e38, e.g. a class predicted with subnormal probabilities), where the
// float tables of backward_float would hold inf. Saved probabilities are read for float64 input
// only (16/32-bit input recomputes its softmax here in float64, as it always has).
template <typename scalar_t, typename index_t>
void backward_double(const BackwardArgs<scalar_t, index_t>& a) {
  const int64_t M = a.L.sources, N = a.L.rows, C = a.L.classes, CC = C * C;
  const double* saved =
      std::is_same_v<scalar_t, double> ? static_cast<const double*>(a.probs) : nullptr;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (C * M));
  at::parallel_for(0, a.L.slices * N, grain, [&](int64_t begin, int64_t end) {
    const int64_t TR = tile_rows(C, end - begin);
    Scratch<double> g(TR * C), loaded(TR * C), e(TR * C), rinv(TR);
    Scratch<int64_t> labels(TR);
    for (int64_t flat = begin; flat < end;) {
      const int64_t s = flat / N, r = flat % N;
      const int64_t nr = std::min({TR, end - flat, N - r});
      std::fill(g.data(), g.data() + nr * C, 0.0);
      for (int64_t j = 0; j < M; ++j) {
        const int64_t gi = s * M + j;
        read_labels(labels.data(), a.t + gi * a.st.target_matrix + r * a.st.target_row,
                    a.st.target_row, nr, C, a.ignore_index);
        gather_rows(g.data(), a.table + gi * CC, labels.data(), a.scales[gi], nr, C);
        for (int64_t i = 0; i < nr; ++i) {
          if (labels[i] == kOutOfRangeLabel)  // its matrix was poisoned in the forward
            std::fill(g.data() + i * C, g.data() + (i + 1) * C,
                      std::numeric_limits<double>::quiet_NaN());
        }
      }
      if (a.from_logits && saved != nullptr) {
        softmax_backward_rows(g.data(), saved + flat * C, nullptr, nr, C);
      } else if (a.from_logits) {
        const double* x = logit_rows(a.x + s * a.st.input_slice + r * a.st.input_row,
                                     a.st.input_row, a.st.input_class, nr, C, loaded.data());
        softmax_rows(x, e.data(), rinv.data(), nr, C);
        softmax_backward_rows(g.data(), e.data(), rinv.data(), nr, C);
      }
      for (int64_t q = 0; q < nr * C; ++q) a.out[flat * C + q] = static_cast<scalar_t>(g[q]);
      flat += nr;
    }
  });
}

// Whether every scaled grad table entry is a finite float (NaN entries, from poisoned matrices,
// pass: they stay NaN either way).
template <typename scalar_t, typename index_t>
bool fits_float(const BackwardArgs<scalar_t, index_t>& a) {
  const int64_t CC = a.L.classes * a.L.classes;
  for (int64_t g = 0; g < a.L.matrices(); ++g) {
    for (int64_t e = 0; e < CC; ++e) {
      if (std::abs(a.scales[g] * a.table[g * CC + e]) > std::numeric_limits<float>::max())
        return false;
    }
  }
  return true;
}

// The gradient into grad_input (input's shape, contiguous), from `saved` probabilities (contiguous,
// see BackwardArgs) when not null; grad_input may be the saved tensor itself (dmi_backward_into):
// every tile reads its rows of it before writing them.
void run_backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                  const at::Tensor& grad_table, bool from_logits, int64_t ignore_index,
                  int64_t reduction, const Layout& L, const void* saved, at::Tensor& grad_input) {
  const int64_t G = L.matrices();
  std::vector<double> scales(G);
  AT_DISPATCH_FLOATING_TYPES(grad_loss.scalar_type(), "dmi_ext_grad_scale", [&] {
    const at::Tensor go = grad_loss.numel() == 1 ? grad_loss : grad_loss.contiguous();
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    for (int64_t g = 0; g < G; ++g) scales[g] = grad_scale(gp, g, G, reduction);
  });
  const at::Tensor table = grad_table.is_contiguous() ? grad_table : grad_table.contiguous();
  const Strides st = strides_of(input, target, L);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "dmi_ext_backward_cpu", [&] {
        auto run = [&](auto index_tag) {
          using index_t = decltype(index_tag);
          const BackwardArgs<scalar_t, index_t> args{
              input.const_data_ptr<scalar_t>(), target.const_data_ptr<index_t>(),
              table.const_data_ptr<double>(),   scales.data(),
              st,                               L,
              from_logits,                      ignore_index,
              grad_input.data_ptr<scalar_t>(),  saved};
          if (std::is_same_v<scalar_t, double> || !fits_float(args)) {
            backward_double(args);
          } else {
            backward_float(args);
          }
        };
        if (target.scalar_type() == at::kLong) {
          run(int64_t{});
        } else {
          run(int32_t{});
        }
      });
}

at::Tensor dmi_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                            const at::Tensor& target, const at::Tensor& grad_table,
                            bool from_logits, int64_t ignore_index, int64_t reduction,
                            const std::optional<at::Tensor>& probs) {
  const Layout L = check_backward(grad_loss, input, target, grad_table, reduction, probs);
  at::Tensor grad_input =
      cpu_empty(input.sizes(), input.scalar_type(), at::MemoryFormat::Contiguous);
  const at::Tensor saved = from_logits && has_probs(probs) ? probs->contiguous() : at::Tensor();
  run_backward(grad_loss, input, target, grad_table, from_logits, ignore_index, reduction, L,
               saved.defined() ? saved.const_data_ptr() : nullptr, grad_input);
  return grad_input;
}

void dmi_backward_into_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                           const at::Tensor& target, const at::Tensor& grad_table,
                           int64_t ignore_index, int64_t reduction, at::Tensor& probs) {
  const Layout L = check_backward(grad_loss, input, target, grad_table, reduction, probs);
  TORCH_CHECK_TYPE(probs.scalar_type() == input.scalar_type() && probs.is_contiguous(),
                   "dmi_ext: argument 'probs' of dmi_backward_into must be contiguous and of "
                   "input's dtype (", input.scalar_type(), "), got ", probs.scalar_type(),
                   probs.is_contiguous() ? "" : ", not contiguous");
  TORCH_CHECK_VALUE(probs.sizes() == input.sizes(), "dmi_ext: argument 'probs' has shape ",
                    probs.sizes(), ", expected input's shape ", input.sizes());
  run_backward(grad_loss, input, target, grad_table, true, ignore_index, reduction, L,
               probs.const_data_ptr(), probs);
}

}  // namespace

TORCH_LIBRARY_IMPL(dmi_ext, CPU, m) {
  m.impl("dmi_backward", &dmi_backward_cpu);
  m.impl("dmi_backward_into", &dmi_backward_into_cpu);
}

}  // namespace dmi_ext::cpu
