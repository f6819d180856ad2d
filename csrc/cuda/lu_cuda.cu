// Stage 2 on the GPU as its own op (lu_loss): from joint sums and counts, log|det U|, the loss,
// the singular flag and the grad table s * dL/dU = -w s U^{-T} of SPEC §4-5, per matrix, float64.
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
  const size_t smem = static_cast<size_t>(C * C) * sizeof(double);
  auto kernel = lu_loss_kernel<Layout>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(G), Layout::kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      sums.const_data_ptr<double>(), counts.const_data_ptr<int64_t>(), static_cast<int>(C),
      normalize, log_eps_of(eps), loss.data_ptr<double>(), lad.data_ptr<double>(),
      singular.data_ptr<bool>(), table.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr int kFinishThreads = 256;
constexpr int kFinishEntriesPerBlock = 8192;

// Grid (chunks of C*C entries, G). Every block of a matrix computes its log|det| from the
// diagonal of the LU factors (the same fixed-order sum in each), writes its chunk of the table,
// and the first block writes the per-matrix outputs. info > 0: an exactly zero pivot (singular).
__global__ void __launch_bounds__(kFinishThreads)
    lu_finish_kernel(const double* __restrict__ lu, const int* __restrict__ info,
                     const double* __restrict__ inverse_t, const double* __restrict__ scale,
                     int C, double log_eps, double* loss, double* logabsdet, bool* singular,
                     double* table) {
  __shared__ double block_lad;
  const int tid = threadIdx.x;
  const int64_t g = blockIdx.y, CC = static_cast<int64_t>(C) * C;
  double s = 0.0;
  for (int k = tid; k < C; k += kFinishThreads) s += log(fabs(lu[g * CC + static_cast<int64_t>(k) * (C + 1)]));
  const double total = block_sum(s);
  if (tid == 0) block_lad = total;
  __syncthreads();
  const bool is_singular = info[g] > 0;
  const double lad = is_singular ? -INFINITY : block_lad;
  const double f = is_singular ? 0.0 : -det_weight(lad, log_eps) * scale[g];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kFinishEntriesPerBlock;
  const int64_t end = std::min<int64_t>(begin + kFinishEntriesPerBlock, CC);
  for (int64_t e = begin + tid; e < end; e += kFinishThreads) {
    table[g * CC + e] = is_singular ? 0.0 : f * inverse_t[g * CC + e];
  }
  if (blockIdx.x == 0 && tid == 0) {
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
  const at::Tensor n = counts.to(at::kDouble);
  const at::Tensor scale =
      normalize ? at::where(counts > 0, at::reciprocal(n), 0.0) : at::ones({G}, opts);
  const at::Tensor A = sums * scale.view({G, 1, 1});
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
  const dim3 grid(static_cast<unsigned>(ceil_div(C * C, kFinishEntriesPerBlock)),
                  static_cast<unsigned>(G));
  lu_finish_kernel<<<grid, kFinishThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      lu.const_data_ptr<double>(), inf.const_data_ptr<int>(), inverse_t.const_data_ptr<double>(),
      scale.contiguous().const_data_ptr<double>(), static_cast<int>(C), log_eps_of(eps),
      loss.data_ptr<double>(), lad.data_ptr<double>(), singular.data_ptr<bool>(),
      table.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
