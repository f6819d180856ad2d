// The fused forward on the GPU: for C <= kFusedMaxClasses one kernel launch (joint_cuda.cu)
// accumulates U, factorises it and writes the loss, log|det U|, the singular flag and the grad
// table; above the limit the same accumulation runs in joint mode and ATen's LU follows
// (lu_cuda.cu). Neither path synchronises with the host.
//
// Validation that needs the host (docs/contract.md §7): the kernels record the first out-of-range label and
// the first row that is not a probability vector in a small device record. With validate=True the
// host reads it after the launch (the one device-to-host synchronisation of the CUDA ops) and
// raises the CPU op's error; with validate=False nothing is read, and a bad label gives a NaN loss
// for its matrix, as on the CPU.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "../dmi.h"
#include "dmi_cuda.h"

namespace dmi_ext::cuda {

namespace {

std::mutex limits_mutex;
std::map<int, DeviceLimits> limits_by_device;
std::map<std::pair<int, const void*>, KernelInfo> info_by_kernel;

int current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

DeviceLimits limits_of(int device) {  // holds limits_mutex
  auto it = limits_by_device.find(device);
  if (it != limits_by_device.end()) return it->second;
  const cudaDeviceProp* p = at::cuda::getDeviceProperties(device);
  DeviceLimits d;
  d.multiprocessors = p->multiProcessorCount;
  d.max_threads_per_block = p->maxThreadsPerBlock;
  d.max_grid_x = p->maxGridSize[0];
  d.max_grid_yz = std::min(p->maxGridSize[1], p->maxGridSize[2]);
  d.smem_per_block = p->sharedMemPerBlock;
  d.smem_per_block_optin = std::max(p->sharedMemPerBlockOptin, p->sharedMemPerBlock);
  d.smem_per_multiprocessor = p->sharedMemPerMultiprocessor;
  d.reserved_smem_per_block = p->reservedSharedMemPerBlock;
  d.max_threads_per_multiprocessor = p->maxThreadsPerMultiProcessor;
  d.max_blocks_per_multiprocessor = p->maxBlocksPerMultiProcessor;
  d.registers_per_multiprocessor = p->regsPerMultiprocessor;
  limits_by_device.emplace(device, d);
  return d;
}

}  // namespace

DeviceLimits device_limits() {
  const int device = current_device();
  const std::lock_guard<std::mutex> lock(limits_mutex);
  return limits_of(device);
}

KernelInfo kernel_info(const void* kernel) {
  const int device = current_device();
  const std::lock_guard<std::mutex> lock(limits_mutex);
  const auto key = std::make_pair(device, kernel);
  auto it = info_by_kernel.find(key);
  if (it != info_by_kernel.end()) return it->second;
  cudaFuncAttributes a{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&a, kernel));
  KernelInfo k;
  k.static_smem = a.sharedSizeBytes;
  k.registers = a.numRegs;
  k.max_threads = a.maxThreadsPerBlock;
  const DeviceLimits d = limits_of(device);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(max_dynamic_smem(k, d))));
  info_by_kernel.emplace(key, k);
  return k;
}

void check_validate_allowed(bool validate) {
  TORCH_CHECK_VALUE(!validate || at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None,
                    "dmi_ext: argument 'validate' is True while the current CUDA stream is being "
                    "captured into a graph; validation reads the kernel's error record on the host, "
                    "which capture forbids. Pass validate=False inside captured regions (a bad label "
                    "then gives a NaN loss for its matrix)");
}

void raise_recorded_errors(const at::Tensor& errors, const at::Tensor& input,
                           const at::Tensor& target, const Layout& L, int64_t ignore_index) {
  const at::Tensor record = errors.to(at::kCPU);  // synchronises with the device
  const uint64_t bad_label = static_cast<uint64_t>(record.const_data_ptr<int64_t>()[0]);
  const uint64_t bad_row = static_cast<uint64_t>(record.const_data_ptr<int64_t>()[1]);
  const int64_t N = L.rows;
  if (bad_row != 0) {
    const int64_t key = static_cast<int64_t>(~bad_row);
    const int64_t slice = key / N, row = key % N;
    // The row as the kernel saw it (converted to the accumulation type), summed like the CPU.
    const at::Tensor values =
        (input.dim() == 3 ? input[slice] : input)[row].to(at::kCPU).to(at::kDouble);
    const double* v = values.const_data_ptr<double>();
    double sum = 0.0, lo = 1.0;
    for (int64_t k = 0; k < values.numel(); ++k) {
      sum += v[k];
      lo = v[k] < lo ? v[k] : lo;
    }
    throw_not_probability(L, slice, row, sum, lo);
  }
  if (bad_label != 0) {
    const int64_t key = static_cast<int64_t>(~bad_label);
    const int64_t matrix = key / N, row = key % N;
    const int64_t label = (L.single ? target : target[matrix])[row].item<int64_t>();
    throw_bad_label(L, matrix, row, label, ignore_index);
  }
}

namespace {

// need_grad_table=False: the (0, C, C) table of the op's contract. The kernels still compute the
// inverse (a GPU forward that skips it is future work; on the CPU it is skipped).
at::Tensor no_table_unless(bool need_grad_table, const at::Tensor& table) {
  return need_grad_table ? table : table.narrow(0, 0, 0);
}

// save_probs: the CUDA forward keeps no probabilities (an empty (0,) tensor): its backward
// recomputes the softmax from the logits, which reads the same bytes that reading saved
// probabilities would, and the forward saves writing N x C of them (docs/contract.md §4).
at::Tensor no_probs(const at::Tensor& input) {
  return at::empty({0}, input.options().dtype(loss_dtype(input.scalar_type())));
}

DmiOutputs dmi_cuda(const at::Tensor& input, const at::Tensor& target, bool from_logits,
                    bool normalize, double eps, int64_t ignore_index, int64_t reduction,
                    bool validate, bool need_grad_table, bool /*save_probs*/) {
  const Layout L = check_forward(input, target, eps, reduction);
  const c10::cuda::CUDAGuard guard(input.device());
  check_validate_allowed(validate);
  const std::vector<int64_t> mshape = matrix_shape(L);
  ForwardOptions o{};
  o.from_logits = from_logits;
  o.validate = validate;
  o.ignore_index = ignore_index;
  o.normalize = normalize;
  o.eps = eps;
  o.reduction = reduction;

  if (L.classes <= kFusedMaxClasses) {
    o.fused = true;
    ForwardOutputs out = run_forward(input, target, L, o);
    if (validate) raise_recorded_errors(out.errors, input, target, L, ignore_index);
    at::Tensor loss = reduction == kReductionNone ? out.loss.view(mshape) : out.loss;
    return {loss, out.logabsdet.view(mshape), out.singular.view(mshape),
            no_table_unless(need_grad_table, out.grad_table), no_probs(input)};
  }

  o.fused = false;
  ForwardOutputs joint = run_forward(input, target, L, o);
  if (validate) raise_recorded_errors(joint.errors, input, target, L, ignore_index);
  auto [loss, lad, singular, table] = lu_loss_library(joint.sums, joint.counts, normalize, eps);
  const at::ScalarType dtype = loss_dtype(input.scalar_type());
  at::Tensor out;
  if (reduction == kReductionNone) {
    out = loss.to(dtype).view(mshape);
  } else {
    at::Tensor total = loss.sum();  // ATen's CUDA reduction: a fixed order for a given shape
    if (reduction == kReductionMean) total = total / static_cast<double>(L.matrices());
    out = total.to(dtype);
  }
  return {out, lad.to(dtype).view(mshape), singular.view(mshape),
          no_table_unless(need_grad_table, table), no_probs(input)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmi_ext, CUDA, m) { m.impl("dmi", &dmi_cuda); }

}  // namespace dmi_ext::cuda
