// Stage 1 on the GPU, and the whole forward in one launch: the joint matrices U (docs/contract.md §3)
// accumulated from the input rows with the softmax fused, and for C <= kFusedMaxClasses the LU
// stage of lu_cuda.cuh run by the same launch on the finished matrices.
//
// Grid: `chunks` blocks per input slice, each over a contiguous range of rows. A block loads a
// tile of rows into shared memory (16-byte loads when rows are contiguous), applies the softmax
// (or checks the probabilities), and adds each kept row into a private float64 accumulator: thread
// (group, column k) owns column k of its group's matrices, so no two threads ever add into the
// same entry and no atomics are needed. The accumulators sit in shared memory when they fit, else
// in the block's own slice of the workspace. Rows are summed in a fixed order per thread, groups
// in group order, blocks in block order (the last block of a slice to finish, found with a ticket
// counter, sums the per-block partials): the result is bitwise reproducible (docs/contract.md §6), and
// float64 accumulation keeps its error from growing with N.
//
// The same launch then finishes each matrix of the slice: the joint sums and counts (the `joint`
// op, and the input of the library LU above the fused limit), or the fused LU stage, and, when the
// loss is reduced, the last slice to finish sums the per-matrix losses in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "../dmi.h"
#include "../dmi_math.h"
#include "dmi_cuda.h"
#include "launch_plan.h"
#include "lu_cuda.cuh"
#include "tiles_cuda.cuh"

namespace dmi_ext::cuda {
namespace {

// Stage 2 of the joint op (and of the library path): write the sums, no LU.
struct JointOnly {
  static constexpr int kThreads = 256;
  static constexpr bool kFused = false;
};
template <class Layout>
struct FusedInverse : Layout {
  static constexpr bool kFused = true;
};

template <typename scalar_t>
using loss_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t, typename index_t>
struct ForwardParams {
  InputView<scalar_t> x;
  TargetView<index_t> t;
  int64_t slices, sources, chunks;
  int groups;          // private accumulators per block
  bool acc_in_shared;  // else in the workspace (partials)
  int tile_rows, lanes;
  size_t off_count, off_poison, off_labels, off_tile;  // dynamic shared memory layout
  bool from_logits, check_probabilities;
  double prob_tol;
  int64_t ignore_index;
  unsigned long long* errors;  // [0] first bad label, [1] first non-probability row
  unsigned int* tickets;       // [s < slices]: chunk ticket of slice s; [slices]: loss ticket
  double* partials;            // [slices * chunks][sources][C][C]
  int64_t* partial_counts;     // [slices * chunks][sources]
  int* partial_poison;         // [slices * chunks][sources]
  double* sums;                // joint: (G, C, C)
  int64_t* counts;             // joint: (G,)
  bool normalize;
  double log_eps;
  int64_t reduction;
  double* loss_each;  // fused, reduced loss: (G,) float64 workspace
  loss_type<scalar_t>* loss;
  loss_type<scalar_t>* logabsdet;
  bool* singular;
  double* table;
};

template <typename scalar_t, typename index_t, class Stage2>
__global__ void __launch_bounds__(Stage2::kThreads)
    forward_kernel(const ForwardParams<scalar_t, index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int is_last;
  __shared__ int64_t matrix_count;
  __shared__ int matrix_poisoned;

  const int tid = threadIdx.x, T = blockDim.x;
  const int C = p.x.classes, TR = p.tile_rows;
  const int64_t N = p.x.rows, M = p.sources, K = p.chunks, S = p.slices;
  const int64_t CC = static_cast<int64_t>(C) * C, MCC = M * CC;
  const int64_t block = blockIdx.x, slice = block / K, chunk = block % K;
  const int64_t r_begin = N * chunk / K, r_end = N * (chunk + 1) / K;

  // Joint op with one block per slice and workspace accumulators: accumulate into the output.
  const bool acc_is_output = !Stage2::kFused && K == 1 && !p.acc_in_shared;
  double* acc = p.acc_in_shared ? reinterpret_cast<double*>(smem)
                : acc_is_output ? p.sums + slice * MCC
                                : p.partials + block * MCC;
  int64_t* count = reinterpret_cast<int64_t*>(smem + p.off_count);  // [groups][M]
  int* poison = reinterpret_cast<int*>(smem + p.off_poison);        // [M]
  int* labels = reinterpret_cast<int*>(smem + p.off_labels);        // [M][TR]
  acc_t* tile = reinterpret_cast<acc_t*>(smem + p.off_tile);        // [TR][C]

  for (int64_t e = tid; e < p.groups * MCC; e += T) acc[e] = 0.0;
  for (int64_t e = tid; e < p.groups * M; e += T) count[e] = 0;
  for (int64_t e = tid; e < M; e += T) poison[e] = 0;
  __syncthreads();

  // This thread's share of the accumulation: column k_first (+ k_step ...) of group `group`.
  int group, k_first, k_step;
  if (C <= T) {
    group = tid / C;
    k_first = tid - group * C;
    k_step = C;
  } else {
    group = 0;
    k_first = tid;
    k_step = T;
  }
  const bool accumulates = group < p.groups;
  const LaneGroup lg = LaneGroup::of_thread(p.lanes);

  for (int64_t row0 = r_begin; row0 < r_end; row0 += TR) {
    const int nr = static_cast<int>(min(static_cast<int64_t>(TR), r_end - row0));
    for (int e = tid; e < M * nr; e += T) {
      const int m = e / nr, i = e - m * nr;
      const int64_t g = slice * M + m, row = row0 + i;
      const int code = label_code(p.t.data[g * p.t.stride_matrix + row * p.t.stride_row], C,
                                  p.ignore_index);
      if (code == kOutOfRangeLabel) {
        record_first(&p.errors[0], g * N + row);
        atomicOr(&poison[m], 1);  // integer: the same result in any order
      }
      labels[m * TR + i] = code;
    }
    load_tile(tile, p.x, slice, row0, nr);
    __syncthreads();
    if (p.from_logits || p.check_probabilities) {
      for (int i = tid / p.lanes; i < nr; i += T / p.lanes) {
        acc_t* row = tile + i * C;
        if (p.from_logits) {
          softmax_row(row, C, lg);
        } else {
          const bool ok = is_probability_row(row, C, p.prob_tol, lg);
          if (!ok && lg.lane == 0) record_first(&p.errors[1], slice * N + row0 + i);
        }
      }
      __syncthreads();
    }
    if (accumulates) {
      for (int i = group; i < nr; i += p.groups) {
        for (int64_t m = 0; m < M; ++m) {
          const int label = labels[m * TR + i];
          if (label < 0) continue;
          double* u = acc + (group * M + m) * CC + static_cast<int64_t>(label) * C;
          for (int k = k_first; k < C; k += k_step) u[k] += static_cast<double>(tile[i * C + k]);
          if (k_first == 0) count[group * M + m] += 1;
        }
      }
    }
    __syncthreads();
  }

  // Where the finished matrices come from: this block's accumulators, or (several blocks per
  // slice, or several matrices to invert one after another) every block's published partial.
  const bool publish = K > 1 || (Stage2::kFused && M > 1);
  if (publish) {
    double* part = p.partials + block * MCC;
    if (p.acc_in_shared) {
      for (int64_t e = tid; e < MCC; e += T) {
        const int64_t m = e / CC, entry = e - m * CC;
        double s = 0.0;
        for (int g = 0; g < p.groups; ++g) s += acc[(g * M + m) * CC + entry];
        part[e] = s;
      }
    }  // else the accumulators already are this block's partial
    for (int64_t m = tid; m < M; m += T) {
      int64_t c = 0;
      for (int g = 0; g < p.groups; ++g) c += count[g * M + m];
      p.partial_counts[block * M + m] = c;
      p.partial_poison[block * M + m] = poison[m];
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = K == 1 || atomicAdd(&p.tickets[slice], 1u) == K - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
  }

  for (int64_t m = 0; m < M; ++m) {
    const int64_t g = slice * M + m;
    MatrixSource source;
    if (publish) {
      source = {p.partials + slice * K * MCC + m * CC, MCC, K, true};
      if (tid == 0) {
        int64_t c = 0;
        int poisoned = 0;
        for (int64_t b = slice * K; b < (slice + 1) * K; ++b) {
          c += __ldcg(p.partial_counts + b * M + m);
          poisoned |= __ldcg(p.partial_poison + b * M + m);
        }
        matrix_count = c;
        matrix_poisoned = poisoned;
      }
    } else {
      source = {acc + m * CC, MCC, p.groups, false};
      if (tid == 0) {
        int64_t c = 0;
        for (int g = 0; g < p.groups; ++g) c += count[g * M + m];
        matrix_count = c;
        matrix_poisoned = poison[m];
      }
    }
    __syncthreads();
    const int64_t kept = matrix_count;
    const bool poisoned = matrix_poisoned != 0;
    if constexpr (Stage2::kFused) {
      __shared__ InverseShared inverse_shared;
      const double scale = joint_scale(kept, p.normalize);
      const InverseResult r =
          invert_matrix<Stage2>(source, C, scale, poisoned, p.log_eps,
                                reinterpret_cast<double*>(smem), inverse_shared, p.table + g * CC);
      if (tid == 0) {
        const double loss = loss_from_logabsdet(r.logabsdet, p.log_eps);
        p.logabsdet[g] = static_cast<loss_type<scalar_t>>(r.logabsdet);
        p.singular[g] = r.singular;
        if (p.reduction == kReductionNone) {
          p.loss[g] = static_cast<loss_type<scalar_t>>(loss);
        } else {
          p.loss_each[g] = loss;
        }
      }
    } else {
      // A label outside [0, C) poisons its matrix: NaN sums, as on the CPU.
      const double nan = __longlong_as_double(0x7ff8000000000000LL);
      double* out = p.sums + g * CC;
      if (acc_is_output) {
        if (poisoned) {
          for (int64_t e = tid; e < CC; e += T) out[e] = nan;
        }
      } else {
        for (int64_t e = tid; e < CC; e += T) out[e] = poisoned ? nan : source.entry(e);
      }
      if (tid == 0) p.counts[g] = kept;
      __syncthreads();
    }
  }

  if constexpr (Stage2::kFused) {
    if (p.reduction != kReductionNone) {
      // The last slice to finish reduces the per-matrix losses, in matrix order.
      __threadfence();
      __syncthreads();
      if (tid == 0) is_last = S == 1 || atomicAdd(&p.tickets[S], 1u) == S - 1;
      __syncthreads();
      if (is_last) {
        __threadfence();
        const int64_t G = S * M;
        double partial = 0.0;  // strided per thread, then block_sum: a fixed order
        for (int64_t e = tid; e < G; e += T) partial += __ldcg(p.loss_each + e);
        const double total = block_sum(partial);
        if (tid == 0) {
          const double value =
              p.reduction == kReductionMean ? total / static_cast<double>(G) : total;
          p.loss[0] = static_cast<loss_type<scalar_t>>(value);
        }
      }
    }
  }
}

template <typename scalar_t, typename index_t, class Stage2>
ForwardOutputs launch(const at::Tensor& input, const at::Tensor& target, const Layout& L,
                      const ForwardOptions& o) {
  using acc_t = at::opmath_type<scalar_t>;
  using loss_t = loss_type<scalar_t>;
  const int64_t S = L.slices, M = L.sources, G = L.matrices(), C = L.classes, CC = C * C;
  auto kernel = forward_kernel<scalar_t, index_t, Stage2>;
  const ForwardPlan plan =
      plan_forward({S, M, L.rows, C, sizeof(acc_t), Stage2::kFused}, Stage2::kThreads,
                   kernel_info(reinterpret_cast<const void*>(kernel)), device_limits());
  TORCH_CHECK(plan.error.empty(), plan.error);
  const int64_t K = plan.chunks;
  const bool publish = K > 1 || (Stage2::kFused && M > 1);
  const bool acc_is_output = !Stage2::kFused && K == 1 && !plan.acc_in_shared;
  const bool need_partials = publish || (!plan.acc_in_shared && !acc_is_output);
  const bool reduced = Stage2::kFused && o.reduction != kReductionNone;

  // Workspace, in int64 words: error record, tickets, partials, partial counts, poison flags,
  // per-matrix losses. Only the record and the tickets need zeroing (one memset).
  const int64_t n_errors = 2, n_tickets = ceil_div(S + 1, 2);  // S + 1 uint32 tickets
  const int64_t n_partials = need_partials ? S * K * M * CC : 0;
  const int64_t n_counts = publish ? S * K * M : 0;
  const int64_t n_poison = publish ? ceil_div(S * K * M, 2) : 0;
  const int64_t n_loss = reduced ? G : 0;
  const at::Tensor workspace = at::empty(
      {n_errors + n_tickets + n_partials + n_counts + n_poison + n_loss},
      input.options().dtype(at::kLong));
  int64_t* w = workspace.data_ptr<int64_t>();
  const bool tickets_used = K > 1 || (reduced && S > 1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (o.validate || tickets_used) {
    C10_CUDA_CHECK(cudaMemsetAsync(w, 0, (n_errors + n_tickets) * sizeof(int64_t), stream));
  }

  ForwardOutputs out;
  out.errors = workspace.narrow(0, 0, n_errors);
  const Strides st = strides_of(input, target, L);
  ForwardParams<scalar_t, index_t> p{};
  p.x = {input.const_data_ptr<scalar_t>(), st.input_slice, st.input_row, st.input_class, L.rows,
         static_cast<int>(C), st.input_class == 1 && st.input_row == C};
  p.t = {target.const_data_ptr<index_t>(), st.target_matrix, st.target_row};
  p.slices = S;
  p.sources = M;
  p.chunks = K;
  p.groups = plan.groups;
  p.acc_in_shared = plan.acc_in_shared;
  p.tile_rows = plan.tile_rows;
  p.lanes = plan.lanes;
  p.off_count = plan.off_count;
  p.off_poison = plan.off_poison;
  p.off_labels = plan.off_labels;
  p.off_tile = plan.off_tile;
  p.from_logits = o.from_logits;
  p.check_probabilities = o.validate && !o.from_logits;
  p.prob_tol = probability_tolerance(sizeof(scalar_t));
  p.ignore_index = o.ignore_index;
  p.errors = reinterpret_cast<unsigned long long*>(w);
  p.tickets = reinterpret_cast<unsigned int*>(w + n_errors);
  p.partials = reinterpret_cast<double*>(w + n_errors + n_tickets);
  p.partial_counts = w + n_errors + n_tickets + n_partials;
  p.partial_poison = reinterpret_cast<int*>(w + n_errors + n_tickets + n_partials + n_counts);
  p.loss_each = reinterpret_cast<double*>(w + n_errors + n_tickets + n_partials + n_counts + n_poison);
  p.normalize = o.normalize;
  p.log_eps = log_eps_of(o.eps);
  p.reduction = o.reduction;

  const auto f64 = input.options().dtype(at::kDouble);
  if constexpr (Stage2::kFused) {
    const at::ScalarType dtype = loss_dtype(input.scalar_type());
    out.loss = reduced ? at::empty({}, input.options().dtype(dtype))
                       : at::empty({G}, input.options().dtype(dtype));
    out.logabsdet = at::empty({G}, input.options().dtype(dtype));
    out.singular = at::empty({G}, input.options().dtype(at::kBool));
    out.grad_table = at::empty({G, C, C}, f64);
    p.loss = out.loss.data_ptr<loss_t>();
    p.logabsdet = out.logabsdet.data_ptr<loss_t>();
    p.singular = out.singular.data_ptr<bool>();
    p.table = out.grad_table.data_ptr<double>();
  } else {
    out.sums = at::empty({G, C, C}, f64);
    out.counts = at::empty({G}, input.options().dtype(at::kLong));
    p.sums = out.sums.data_ptr<double>();
    p.counts = out.counts.data_ptr<int64_t>();
  }

  kernel<<<static_cast<unsigned>(plan.blocks), plan.threads, plan.smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename scalar_t, typename index_t>
ForwardOutputs launch_for_classes(const at::Tensor& input, const at::Tensor& target,
                                  const Layout& L, const ForwardOptions& o) {
  if (!o.fused) return launch<scalar_t, index_t, JointOnly>(input, target, L, o);
  TORCH_CHECK(L.classes <= kFusedMaxClasses, "dmi_ext: the fused forward takes C <= ",
              kFusedMaxClasses, ", got C = ", L.classes);
  if (L.classes <= InverseUpTo32::kMaxClasses) {
    return launch<scalar_t, index_t, FusedInverse<InverseUpTo32>>(input, target, L, o);
  }
  if (L.classes <= InverseUpTo64::kMaxClasses) {
    return launch<scalar_t, index_t, FusedInverse<InverseUpTo64>>(input, target, L, o);
  }
  return launch<scalar_t, index_t, FusedInverse<InverseUpTo128>>(input, target, L, o);
}

}  // namespace

ForwardOutputs run_forward(const at::Tensor& input, const at::Tensor& target, const Layout& L,
                           const ForwardOptions& o) {
  ForwardOutputs out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "dmi_ext_forward_cuda", [&] {
                                    if (target.scalar_type() == at::kLong) {
                                      out = launch_for_classes<scalar_t, int64_t>(input, target, L, o);
                                    } else {
                                      out = launch_for_classes<scalar_t, int32_t>(input, target, L, o);
                                    }
                                  });
  return out;
}

namespace {

std::tuple<at::Tensor, at::Tensor> joint_cuda(const at::Tensor& input, const at::Tensor& target,
                                              bool from_logits, int64_t ignore_index,
                                              bool validate) {
  const Layout L = check_inputs(input, target);
  const c10::cuda::CUDAGuard guard(input.device());
  check_validate_allowed(validate);
  ForwardOptions o{};
  o.fused = false;
  o.from_logits = from_logits;
  o.validate = validate;
  o.ignore_index = ignore_index;
  ForwardOutputs out = run_forward(input, target, L, o);
  if (validate) raise_recorded_errors(out.errors, input, target, L, ignore_index);
  if (L.single) return {out.sums.squeeze(0), out.counts.squeeze(0)};
  return {out.sums, out.counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmi_ext, CUDA, m) { m.impl("joint", &joint_cuda); }

}  // namespace dmi_ext::cuda
