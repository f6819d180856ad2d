// Stage 3 on the GPU, one launch: every row reads its logits (or nothing, when the input holds
// probabilities: their gradient does not depend on them) and its labels once, and its gradient is
// written once, in the input's dtype (docs/contract.md §4). Row i gets g_i = sum over its matrices of
// scale_g * grad_table[g][t_gi], then, from logits, p_i * (g_i - <g_i, p_i>) with p_i recomputed
// by the forward's softmax. The scales come from grad_loss on the device (no host read).
//
// A persistent grid walks tiles of rows (a tile never spans two slices); a tile is loaded into
// shared memory with 16-byte loads, processed by groups of lanes per row, and stored back with
// 16-byte stores. The grad table rows of a slice are staged in shared memory, scaled, when they
// fit and are reused by enough rows; otherwise they are read through the read-only cache.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../dmi.h"
#include "../dmi_math.h"
#include "dmi_cuda.h"
#include "launch_plan.h"
#include "tiles_cuda.cuh"

namespace dmi_ext::cuda {
namespace {

constexpr double kFloatMax = 3.4028234663852886e38;  // FLT_MAX

template <typename grad_t>
struct StridedGrad {  // grad_loss[g], read through its stride (0 when expanded)
  const grad_t* data;
  int64_t stride;
  __device__ grad_t operator[](int64_t i) const { return data[i * stride]; }
};

template <typename scalar_t, typename index_t, typename grad_t>
struct BackwardParams {
  InputView<scalar_t> x;
  TargetView<index_t> t;
  const double* table;  // (G, C, C)
  StridedGrad<grad_t> grad_loss;
  int64_t reduction;
  int64_t slices, sources;
  bool from_logits;
  int64_t ignore_index;
  int tile_rows, lanes;
  bool stage_table;
  size_t off_labels, off_tile;
  scalar_t* out;  // (slices, rows, C), contiguous
};

template <typename scalar_t, typename index_t, typename grad_t>
__global__ void __launch_bounds__(kBackwardThreads)
    backward_kernel(const BackwardParams<scalar_t, index_t, grad_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  double* staged = reinterpret_cast<double*>(smem);                // [M][C][C], scaled
  int* labels = reinterpret_cast<int*>(smem + p.off_labels);       // [M][TR]
  acc_t* tile = reinterpret_cast<acc_t*>(smem + p.off_tile);       // [TR][C]

  const int tid = threadIdx.x, T = blockDim.x;
  const int C = p.x.classes, TR = p.tile_rows;
  const int64_t N = p.x.rows, M = p.sources, G = p.slices * M;
  const int64_t CC = static_cast<int64_t>(C) * C;
  const int64_t tiles_per_slice = (N + TR - 1) / TR, tiles = p.slices * tiles_per_slice;
  const LaneGroup lg = LaneGroup::of_thread(p.lanes);
  const acc_t nan = static_cast<acc_t>(NAN);
  int64_t staged_slice = -1;

  for (int64_t tile_id = blockIdx.x; tile_id < tiles; tile_id += gridDim.x) {
    const int64_t slice = tile_id / tiles_per_slice;
    const int64_t row0 = (tile_id - slice * tiles_per_slice) * TR;
    const int nr = static_cast<int>(std::min<int64_t>(TR, N - row0));
    if (p.stage_table && slice != staged_slice) {  // block-uniform; the last tile ended in a barrier
      for (int64_t e = tid; e < M * CC; e += T) {
        const int64_t g = slice * M + e / CC;
        staged[e] = grad_scale(p.grad_loss, g, G, p.reduction) * p.table[slice * M * CC + e];
      }
      staged_slice = slice;
    }
    for (int e = tid; e < M * nr; e += T) {
      const int m = e / nr, i = e - m * nr;
      const int64_t g = slice * M + m;
      labels[m * TR + i] = label_code(p.t.data[g * p.t.stride_matrix + (row0 + i) * p.t.stride_row],
                                      C, p.ignore_index);
    }
    if (p.from_logits) load_tile(tile, p.x, slice, row0, nr);
    __syncthreads();

    for (int i = tid / p.lanes; i < nr; i += T / p.lanes) {
      acc_t* row = tile + i * C;
      // dL/dP[i, k]: the sum over this row's matrices of scale_g * table_g[label, k], each term
      // rounded to acc_t as on the CPU; NaN for a label outside [0, C) (its matrix is NaN too).
      // `wide`: a term beyond the float range (a class predicted with subnormal probabilities
      // makes |U^-1| exceed 3.4e38), after which the row is redone in float64 below.
      bool wide = false;
      auto term = [&](int64_t m, int label, int k) -> double {
        const int64_t entry = (m * C + label) * C + k;
        return p.stage_table ? staged[entry]
                             : grad_scale(p.grad_loss, slice * M + m, G, p.reduction) *
                                   __ldg(p.table + slice * M * CC + entry);
      };
      auto grad_p = [&](int k) -> acc_t {
        acc_t gk = 0;
        for (int64_t m = 0; m < M; ++m) {
          const int label = labels[m * TR + i];
          if (label == kOutOfRangeLabel) return nan;
          if (label < 0) continue;
          const double v = term(m, label, k);
          wide = wide || fabs(v) > kFloatMax;
          gk += static_cast<acc_t>(v);
        }
        return gk;
      };
      if (p.from_logits) {
        const acc_t inv = acc_t(1) / exp_shifted_row(row, C, lg);
        acc_t dot = 0;
        for (int k = lg.lane; k < C; k += lg.lanes) {
          const acc_t pk = row[k] * inv;
          row[k] = pk;
          dot += grad_p(k) * pk;
        }
        dot = lg.sum(dot);
        for (int k = lg.lane; k < C; k += lg.lanes) row[k] = row[k] * (grad_p(k) - dot);
        if constexpr (!std::is_same_v<acc_t, double>) {
          // The CPU's float64 backward for this row: g in float64, the softmax recomputed in
          // float64 from the logits, the result rounded once. The CPU switches for the whole call
          // when any table entry is beyond the float range; here only the rows that need it do.
          if (lg.max(wide ? 1 : 0) != 0) {
            const scalar_t* x = p.x.data + slice * p.x.stride_slice + (row0 + i) * p.x.stride_row;
            auto logit = [&](int k) { return static_cast<double>(x[k * p.x.stride_class]); };
            auto grad_p64 = [&](int k) -> double {
              double gk = 0.0;
              for (int64_t m = 0; m < M; ++m) {
                const int label = labels[m * TR + i];
                if (label == kOutOfRangeLabel) return NAN;
                if (label >= 0) gk += term(m, label, k);
              }
              return gk;
            };
            double mx = -INFINITY;
            for (int k = lg.lane; k < C; k += lg.lanes) mx = logit(k) > mx ? logit(k) : mx;
            mx = lg.max(mx);
            double sum = 0.0;
            for (int k = lg.lane; k < C; k += lg.lanes) sum += exp(logit(k) - mx);
            const double inv64 = 1.0 / lg.sum(sum);
            double dot64 = 0.0;
            for (int k = lg.lane; k < C; k += lg.lanes) dot64 += grad_p64(k) * (exp(logit(k) - mx) * inv64);
            dot64 = lg.sum(dot64);
            for (int k = lg.lane; k < C; k += lg.lanes) {
              row[k] = static_cast<acc_t>(exp(logit(k) - mx) * inv64 * (grad_p64(k) - dot64));
            }
          }
        }
      } else {
        for (int k = lg.lane; k < C; k += lg.lanes) row[k] = grad_p(k);
      }
    }
    __syncthreads();
    store_tile(p.out + (slice * N + row0) * C, tile, nr * C);
    __syncthreads();
  }
}

template <typename scalar_t, typename index_t, typename grad_t>
void launch_backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                     const at::Tensor& table, bool from_logits, int64_t ignore_index,
                     int64_t reduction, const Layout& L, at::Tensor& grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = L.slices, M = L.sources, N = L.rows, C = L.classes;
  const Strides st = strides_of(input, target, L);

  BackwardParams<scalar_t, index_t, grad_t> p{};
  p.x = {input.const_data_ptr<scalar_t>(), st.input_slice, st.input_row, st.input_class, N,
         static_cast<int>(C), st.input_class == 1 && st.input_row == C};
  p.t = {target.const_data_ptr<index_t>(), st.target_matrix, st.target_row};
  p.table = table.const_data_ptr<double>();
  p.grad_loss = {grad_loss.const_data_ptr<grad_t>(), grad_loss.dim() == 0 ? 0 : grad_loss.stride(0)};
  p.reduction = reduction;
  p.slices = S;
  p.sources = M;
  p.from_logits = from_logits;
  p.ignore_index = ignore_index;
  auto kernel = backward_kernel<scalar_t, index_t, grad_t>;
  const BackwardPlan plan = plan_backward({S, M, N, C, sizeof(acc_t)},
                                          kernel_info(reinterpret_cast<const void*>(kernel)),
                                          device_limits());
  TORCH_CHECK(plan.error.empty(), plan.error);
  p.lanes = plan.lanes;
  p.tile_rows = plan.tile_rows;
  p.stage_table = plan.stage_table;
  p.off_labels = plan.off_labels;
  p.off_tile = plan.off_tile;
  p.out = grad_input.data_ptr<scalar_t>();
  kernel<<<static_cast<unsigned>(plan.blocks), plan.threads, plan.smem,
           at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dmi_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& input,
                             const at::Tensor& target, const at::Tensor& grad_table,
                             bool from_logits, int64_t ignore_index, int64_t reduction,
                             const std::optional<at::Tensor>& probs) {
  // Given probabilities are checked like the CPU's; the kernel recomputes the softmax (the same
  // bytes read as from saved probabilities, see dmi_cuda.cu).
  const Layout L = check_backward(grad_loss, input, target, grad_table, reduction, probs);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor table = grad_table.contiguous();
  at::Tensor go = grad_loss.reshape({-1});
  if (go.scalar_type() != at::kFloat && go.scalar_type() != at::kDouble) go = go.to(at::kFloat);
  at::Tensor grad_input =
      at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "dmi_ext_backward_cuda", [&] {
        using input_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "dmi_ext_backward_grad_cuda", [&] {
          using grad_t = scalar_t;
          if (target.scalar_type() == at::kLong) {
            launch_backward<input_t, int64_t, grad_t>(go, input, target, table, from_logits,
                                                      ignore_index, reduction, L, grad_input);
          } else {
            launch_backward<input_t, int32_t, grad_t>(go, input, target, table, from_logits,
                                                      ignore_index, reduction, L, grad_input);
          }
        });
      });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmi_ext, CUDA, m) { m.impl("dmi_backward", &dmi_backward_cuda); }

}  // namespace dmi_ext::cuda
