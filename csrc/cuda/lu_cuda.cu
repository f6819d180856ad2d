// Stage 2 on the GPU as its own op (lu_loss): from joint sums and counts, log|det U|, the loss,
// the singular flag and the grad table s * dL/dU = -w s U^{-T} of docs/contract.md §4-5, per matrix, float64.
//
// Up to kFusedMaxClasses one block per matrix runs the in-register Gauss-Jordan of lu_cuda.cuh
// (the same code the fused forward runs). Above it the matrices go to ATen's batched LU
// (cuSOLVER / cuBLAS / MAGMA, as ATen picks) with check_errors=false, so nothing waits for the
// host, and one small kernel turns the factors into log|det|, the loss and the table.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../dmi.h"
#include "../dmi_math.h"
#include "dmi_cuda.h"
#include "launch_plan.h"
#include "lu_cuda.cuh"
#include "tiles_cuda.cuh"

namespace dmi_ext::cuda {
namespace {

template <class Layout>
__global__ void __launch_bounds__(Layout::kThreads)
    lu_loss_kernel(const double* __restrict__ sums, const int64_t* __restrict__ counts, int C,
                   bool normalize, double log_eps, double* loss, double* logabsdet,
                   bool* singular, double* table) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ InverseShared inverse_shared;
  const int64_t g = blockIdx.x, CC = static_cast<int64_t>(C) * C;
  const MatrixSource source{sums + g * CC, 0, 1, false};
  const double scale = joint_scale(counts[g], normalize);
  const InverseResult r = invert_matrix<Layout>(source, C, scale, false, log_eps,
                                                reinterpret_cast<double*>(smem), inverse_shared,
                                                table + g * CC);
  if (threadIdx.x == 0) {
    loss[g] = loss_from_logabsdet(r.logabsdet, log_eps);
    logabsdet[g] = r.logabsdet;
    singular[g] = r.singular;
  }
}

template <class Layout>
void launch_lu_loss(const at::Tensor& sums, const at::Tensor& counts, bool normalize, double eps,
                    at::Tensor& loss, at::Tensor& lad, at::Tensor& singular, at::Tensor& table) {
  const int64_t G = sums.size(0), C = sums.size(1);
  auto kernel = lu_loss_kernel<Layout>;
  const LuPlan plan = plan_lu(G, C, Layout::kThreads,
                              kernel_info(reinterpret_cast<const void*>(kernel)), device_limits());
  TORCH_CHECK(plan.error.empty(), plan.error);
  kernel<<<static_cast<unsigned>(plan.blocks), plan.threads, plan.smem,
           at::cuda::getCurrentCUDAStream()>>>(
      sums.const_data_ptr<double>(), counts.const_data_ptr<int64_t>(), static_cast<int>(C),
      normalize, log_eps_of(eps), loss.data_ptr<double>(), lad.data_ptr<double>(),
      singular.data_ptr<bool>(), table.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr int kEquilibrateThreads = 256;

// The singular rule's equilibration (dmi_math.h) before ATen's LU, one block per matrix, as
// lu_cpu.cpp's lu_loss_lapack does it: A = s * sums with each row divided by the power of two that
// puts its largest |entry| in [1, 2), then each column of the result likewise. exponents[g] holds
// the row exponents, the column exponents and their total (2C + 1 ints).
__global__ void __launch_bounds__(kEquilibrateThreads)
    equilibrate_kernel(const double* __restrict__ sums, const int64_t* __restrict__ counts,
                       bool normalize, int C, double* A, int* exponents) {
  const int64_t g = blockIdx.x, CC = static_cast<int64_t>(C) * C;
  const double s = joint_scale(counts[g], normalize);
  const double* u = sums + g * CC;
  double* a = A + g * CC;
  int* e = exponents + g * (2 * C + 1);
  for (int t = threadIdx.x; t < C; t += blockDim.x) {
    double m = 0.0;
    for (int k = 0; k < C; ++k) {
      const double v = fabs(s * u[t * C + k]);
      m = v > m ? v : m;
    }
    const int r = scale_exponent(m);
    e[t] = r;
    for (int k = 0; k < C; ++k) a[t * C + k] = times_pow2(s * u[t * C + k], -r);
  }
  __syncthreads();  // the row-scaled A, written by other threads of the block
  for (int k = threadIdx.x; k < C; k += blockDim.x) {
    double m = 0.0;
    for (int t = 0; t < C; ++t) {
      const double v = fabs(a[t * C + k]);
      m = v > m ? v : m;
    }
    const int c = scale_exponent(m);
    e[C + k] = c;
    if (c != 0) {
      for (int t = 0; t < C; ++t) a[t * C + k] = times_pow2(a[t * C + k], -c);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int i = 0; i < 2 * C; ++i) total += e[i];
    e[2 * C] = total;
  }
}

// chunks_per_matrix blocks per matrix, all in gridDim.x. Every block of a matrix decides its
// singular flag and log|det| from the diagonal of the LU factors of the equilibrated A (the same
// fixed-order sums in each), writes its chunk of the table with the equilibration undone, and the
// first block writes the per-matrix outputs. info > 0 (an exactly zero pivot) or a pivot with
// |pivot| <= pivot_tolerance(C): singular, the CPU's rule.
__global__ void __launch_bounds__(kFinishThreads)
    lu_finish_kernel(const double* __restrict__ lu, const int* __restrict__ info,
                     const double* __restrict__ inverse_t, const int64_t* __restrict__ counts,
                     const int* __restrict__ exponents, bool normalize, int C,
                     int64_t chunks_per_matrix, double log_eps, double* loss, double* logabsdet,
                     bool* singular, double* table) {
  __shared__ double block_lad, block_small;
  const int tid = threadIdx.x;
  const int64_t g = blockIdx.x / chunks_per_matrix, chunk = blockIdx.x % chunks_per_matrix;
  const int64_t CC = static_cast<int64_t>(C) * C;
  const double tolerance = pivot_tolerance(C);
  double s = 0.0, small = 0.0;
  for (int k = tid; k < C; k += kFinishThreads) {
    const double d = fabs(lu[g * CC + static_cast<int64_t>(k) * (C + 1)]);
    s += log(d);
    small += d <= tolerance ? 1.0 : 0.0;
  }
  const double total = block_sum(s);
  if (tid == 0) block_lad = total;
  __syncthreads();
  const double smalls = block_sum(small);
  if (tid == 0) block_small = smalls;
  __syncthreads();
  const int* e = exponents + g * (2 * C + 1);
  const bool is_singular = info[g] > 0 || block_small > 0.0;
  const double lad = is_singular ? -INFINITY : block_lad + e[2 * C] * kLn2;
  const double f = is_singular ? 0.0 : -det_weight(lad, log_eps) * joint_scale(counts[g], normalize);
  const int64_t begin = chunk * kFinishEntriesPerBlock;
  const int64_t end = std::min<int64_t>(begin + kFinishEntriesPerBlock, CC);
  for (int64_t q = begin + tid; q < end; q += kFinishThreads) {
    const int t = static_cast<int>(q / C), k = static_cast<int>(q - static_cast<int64_t>(t) * C);
    table[g * CC + q] =
        is_singular ? 0.0 : f * times_pow2(inverse_t[g * CC + q], -(e[C + k] + e[t]));
  }
  if (chunk == 0 && tid == 0) {
    loss[g] = loss_from_logabsdet(lad, log_eps);
    logabsdet[g] = lad;
    singular[g] = is_singular;
  }
}

}  // namespace

LossOutputs lu_loss_library(const at::Tensor& sums, const at::Tensor& counts, bool normalize,
                            double eps) {
  const int64_t G = sums.size(0), C = sums.size(1);
  const auto opts = sums.options();
  const FinishPlan plan = plan_finish(G, C, device_limits());
  TORCH_CHECK(plan.error.empty(), plan.error);
  TORCH_CHECK(G <= device_limits().max_grid_x, "dmi_ext: ", G, " matrices exceed one launch's grid");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor A = at::empty({G, C, C}, opts);
  const at::Tensor exponents = at::empty({G, 2 * C + 1}, opts.dtype(at::kInt));
  equilibrate_kernel<<<static_cast<unsigned>(G), kEquilibrateThreads, 0, stream>>>(
      sums.const_data_ptr<double>(), counts.const_data_ptr<int64_t>(), normalize,
      static_cast<int>(C), A.data_ptr<double>(), exponents.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto [LU, pivots, info] = at::linalg_lu_factor_ex(A, /*pivot=*/true, /*check_errors=*/false);
  const at::Tensor eye = at::eye(C, opts).expand({G, C, C});
  const at::Tensor inverse_t =
      at::linalg_lu_solve(LU, pivots, eye, /*left=*/true, /*adjoint=*/true).contiguous();
  const at::Tensor lu = LU.contiguous();
  const at::Tensor inf = info.to(at::kInt).contiguous();
  at::Tensor loss = at::empty({G}, opts);
  at::Tensor lad = at::empty({G}, opts);
  at::Tensor singular = at::empty({G}, opts.dtype(at::kBool));
  at::Tensor table = at::empty({G, C, C}, opts);
  lu_finish_kernel<<<static_cast<unsigned>(plan.blocks), kFinishThreads, 0, stream>>>(
      lu.const_data_ptr<double>(), inf.const_data_ptr<int>(), inverse_t.const_data_ptr<double>(),
      counts.const_data_ptr<int64_t>(), exponents.const_data_ptr<int>(), normalize,
      static_cast<int>(C), plan.chunks_per_matrix, log_eps_of(eps), loss.data_ptr<double>(),
      lad.data_ptr<double>(), singular.data_ptr<bool>(), table.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // dmi_math.h's overflow rule (table_overflowed: an inf and no NaN gives gradient 0) per matrix,
  // in tensor ops because a matrix's table spans several blocks here; on the device, no host read.
  const at::Tensor entries = table.view({G, C * C});
  const at::Tensor overflowed = entries.isinf().any(1).logical_and_(entries.isnan().any(1).logical_not_());
  table.masked_fill_(overflowed.view({G, 1, 1}), 0.0);
  return {loss, lad, singular, table};
}

namespace {

LossOutputs lu_loss_cuda(const at::Tensor& sums, const at::Tensor& counts, bool normalize,
                         double eps) {
  check_joint(sums, counts);
  check_eps(eps);
  const c10::cuda::CUDAGuard guard(sums.device());
  const int64_t C = sums.size(-1);
  const at::Tensor s = sums.reshape({-1, C, C}).contiguous();
  const at::Tensor n = counts.reshape({-1}).contiguous();
  const int64_t G = s.size(0);
  const auto batch = counts.sizes();
  const auto opts = sums.options();
  if (G == 0) {
    return {at::empty(batch, opts), at::empty(batch, opts), at::empty(batch, opts.dtype(at::kBool)),
            at::empty(sums.sizes(), opts)};
  }
  if (C > kFusedMaxClasses) {
    auto [loss, lad, singular, table] = lu_loss_library(s, n, normalize, eps);
    return {loss.view(batch), lad.view(batch), singular.view(batch), table.view(sums.sizes())};
  }
  at::Tensor loss = at::empty({G}, opts);
  at::Tensor lad = at::empty({G}, opts);
  at::Tensor singular = at::empty({G}, opts.dtype(at::kBool));
  at::Tensor table = at::empty({G, C, C}, opts);
  if (C <= InverseUpTo32::kMaxClasses) {
    launch_lu_loss<InverseUpTo32>(s, n, normalize, eps, loss, lad, singular, table);
  } else if (C <= InverseUpTo64::kMaxClasses) {
    launch_lu_loss<InverseUpTo64>(s, n, normalize, eps, loss, lad, singular, table);
  } else {
    launch_lu_loss<InverseUpTo128>(s, n, normalize, eps, loss, lad, singular, table);
  }
  return {loss.view(batch), lad.view(batch), singular.view(batch), table.view(sums.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmi_ext, CUDA, m) { m.impl("lu_loss", &lu_loss_cuda); }

}  // namespace dmi_ext::cuda
