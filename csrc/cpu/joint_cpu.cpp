// Stage 1 on the CPU: one pass over the input rows accumulates U_g[label, :] += P_i (docs/contract.md §3).
#include "joint_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../dmi_math.h"
#include "softmax_cpu.h"
#include "tiles_cpu.h"

namespace dmi_ext::cpu {
namespace {

// Row chunks per input slice. Slices are independent, so chunking only pays while there are
// fewer slices than threads, the chunk has enough work, and its partial C x C matrices stay small
// next to the rows it sums.
int64_t chunks_per_slice(const Layout& L, int64_t threads) {
  if (threads <= 1 || L.slices >= threads) return 1;
  const int64_t work = L.rows * L.classes * L.sources;
  int64_t k = threads / L.slices;
  k = std::min(k, std::max<int64_t>(1, work / kGrainElements));
  k = std::min(k, std::max<int64_t>(1, L.rows / L.classes));
  return std::max<int64_t>(k, 1);
}

template <typename scalar_t>
using acc_t_of = at::opmath_type<scalar_t>;

template <typename scalar_t, typename index_t>
void joint_kernel(const at::Tensor& input, const at::Tensor& target, const Layout& L,
                  bool from_logits, int64_t ignore_index, bool validate, double* sums,
                  int64_t* counts, acc_t_of<scalar_t>* probs_out) {
  using acc_t = acc_t_of<scalar_t>;
  const Strides st = strides_of(input, target, L);
  const scalar_t* xp = input.const_data_ptr<scalar_t>();
  const index_t* tp = target.const_data_ptr<index_t>();
  const int64_t S = L.slices, M = L.sources, N = L.rows, C = L.classes, CC = C * C;
  // Logit rows already in the accumulation type and packed are read in place, not copied
  // (probability rows are copied: the accumulation reads a little past each row's end).
  const bool read_in_place =
      from_logits && rows_in_place<scalar_t, acc_t>(st.input_row, st.input_class, C);
  const double prob_tol = probability_tolerance(sizeof(scalar_t));

  const int64_t K = chunks_per_slice(L, at::get_num_threads());
  // Partials of different tasks start on separate cache lines (no false sharing).
  const int64_t part_stride = (M * CC + 7) / 8 * 8;
  const at::Tensor partials =
      K > 1 ? at::zeros({S * K * part_stride}, input.options().dtype(at::kDouble)) : at::Tensor();
  double* partial = K > 1 ? partials.data_ptr<double>() : nullptr;
  std::vector<int64_t> part_counts(K > 1 ? S * K * M : 0);

  const int64_t tasks = S * K;
  const int64_t grain = K > 1 ? 1 : std::max<int64_t>(1, kGrainElements / (N * C * M));
  at::parallel_for(0, tasks, grain, [&](int64_t task_begin, int64_t task_end) {
    const int64_t TR = tile_rows(C, (N + K - 1) / K);
    Scratch<acc_t> loaded(read_in_place ? 0 : TR * C + kTileSlack);
    Scratch<acc_t> probs(from_logits ? TR * C + kTileSlack : 0);
    Scratch<acc_t> rinv(from_logits ? TR + kTileSlack : 0);
    Scratch<int64_t> labels(TR);
    std::vector<int64_t> kept(M);
    std::vector<char> invalid(M);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t s = task / K, k = task % K;
      const int64_t r0 = N * k / K, r1 = N * (k + 1) / K;
      double* dst = K > 1 ? partial + task * part_stride : sums + s * M * CC;
      std::fill(kept.begin(), kept.end(), 0);
      std::fill(invalid.begin(), invalid.end(), char{0});
      for (int64_t r = r0; r < r1; r += TR) {
        const int64_t nr = std::min(TR, r1 - r);
        const scalar_t* rows = xp + s * st.input_slice + r * st.input_row;
        const acc_t* x;
        if (from_logits) {
          x = logit_rows(rows, st.input_row, st.input_class, nr, C, loaded.data());
        } else {
          load_rows(loaded.data(), rows, st.input_row, st.input_class, nr, C);
          x = loaded.data();
        }
        const acc_t* p = x;
        const acc_t* p_scale = nullptr;  // row i of P is p[i, :] * p_scale[i]
        if (from_logits) {
          softmax_rows(x, probs.data(), rinv.data(), nr, C);
          if (probs_out != nullptr)
            probability_rows(probs_out + (s * N + r) * C, probs.data(), rinv.data(), nr, C);
          p = probs.data();
          p_scale = rinv.data();
        } else if (validate) {
          double bad_sum = 0, bad_min = 0;
          const int64_t bad = first_non_probability_row(p, nr, C, prob_tol, &bad_sum, &bad_min);
          if (bad >= 0) throw_not_probability(L, s, r + bad, bad_sum, bad_min);
        }
        for (int64_t j = 0; j < M; ++j) {
          const int64_t g = s * M + j;
          const index_t* tg = tp + g * st.target_matrix + r * st.target_row;
          kept[j] += read_labels(labels.data(), tg, st.target_row, nr, C, ignore_index);
          for (int64_t i = 0; i < nr; ++i) {
            if (labels[i] != kOutOfRangeLabel) continue;
            if (validate) {
              throw_bad_label(L, g, r + i, static_cast<int64_t>(tg[i * st.target_row]),
                              ignore_index);
            }
            invalid[j] = 1;
          }
          accumulate_rows(dst + j * CC, p, p_scale, labels.data(), nr, C);
        }
      }
      for (int64_t j = 0; j < M; ++j) {
        // Without validation a bad label poisons its matrix: NaN loss, never silent garbage.
        if (invalid[j]) {
          std::fill(dst + j * CC, dst + (j + 1) * CC, std::numeric_limits<double>::quiet_NaN());
        }
        if (K > 1) {
          part_counts[task * M + j] = kept[j];
        } else {
          counts[s * M + j] = kept[j];
        }
      }
    }
  });

  if (K > 1) {  // combine the partials of each slice in chunk order: a fixed summation order
    for (int64_t s = 0; s < S; ++s) {
      double* dst = sums + s * M * CC;
      for (int64_t k = 0; k < K; ++k) {
        const double* src = partial + (s * K + k) * part_stride;
        for (int64_t e = 0; e < M * CC; ++e) dst[e] += src[e];
        for (int64_t j = 0; j < M; ++j) counts[s * M + j] += part_counts[(s * K + k) * M + j];
      }
    }
  }
}

}  // namespace

void joint_accumulate(const at::Tensor& input, const at::Tensor& target, const Layout& layout,
                      bool from_logits, int64_t ignore_index, bool validate, double* sums,
                      int64_t* counts, void* probs_out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "dmi_ext_joint_cpu", [&] {
        auto* probs = static_cast<acc_t_of<scalar_t>*>(probs_out);
        if (target.scalar_type() == at::kLong) {
          joint_kernel<scalar_t, int64_t>(input, target, layout, from_logits, ignore_index,
                                          validate, sums, counts, probs);
        } else {
          joint_kernel<scalar_t, int32_t>(input, target, layout, from_logits, ignore_index,
                                          validate, sums, counts, probs);
        }
      });
}

namespace {

std::tuple<at::Tensor, at::Tensor> joint_cpu(const at::Tensor& input, const at::Tensor& target,
                                             bool from_logits, int64_t ignore_index,
                                             bool validate) {
  const Layout L = check_inputs(input, target);
  const int64_t G = L.matrices(), C = L.classes;
  at::Tensor sums = at::zeros({G, C, C}, input.options().dtype(at::kDouble));
  at::Tensor counts = at::zeros({G}, input.options().dtype(at::kLong));
  joint_accumulate(input, target, L, from_logits, ignore_index, validate,
                   sums.data_ptr<double>(), counts.data_ptr<int64_t>());
  if (L.single) return {sums.squeeze(0), counts.squeeze(0)};
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmi_ext, CPU, m) { m.impl("joint", &joint_cpu); }

}  // namespace dmi_ext::cpu
