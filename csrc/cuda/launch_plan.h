// The launch decisions of the CUDA kernels, as pure functions of the shapes, the dtypes and the
// limits of the device and of each kernel: grid, block, dynamic shared memory and its layout. No
// CUDA or ATen here, so tests/cuda_emulation/plan_test.cpp checks every decision against the
// driver's rules over a wide grid of shapes on a machine without a GPU, and the emulator runs the
// same plans.
//
// The driver's rules a plan keeps (CUDA programming guide, "Compute capabilities"):
//   - threads per block <= 1024 and <= the kernel's own maximum (registers, launch bounds);
//   - gridDim.x <= 2^31 - 1, gridDim.y and gridDim.z <= 65535;
//   - static + dynamic shared memory <= 48 KB, or, once the kernel's
//     cudaFuncAttributeMaxDynamicSharedMemorySize has been raised to at least the dynamic size,
//     <= sharedMemPerBlockOptin (that attribute itself may not exceed optin - static).
// The attribute is raised once per device and kernel, to optin - static (kernel_info in
// dmi_cuda.cu), and never lowered, so every plan below is launchable whatever ran before it,
// from any host thread, and a CUDA graph captured earlier stays valid.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define DMI_PLAN_HD __host__ __device__
#else
#define DMI_PLAN_HD
#endif

namespace dmi_ext::cuda {

// A tile holds about this many elements (16 KB of float), and at most kMaxTileRows rows.
constexpr int kTileElements = 4096;
constexpr int kMaxTileRows = 1024;
// Bytes of shared memory for the label codes of a tile, all label sources together: bounds the
// tile's rows when there are many sources.
constexpr size_t kLabelBudget = 16 * 1024;
// Shared memory the forward's private accumulators may take; above it they go to the workspace.
constexpr size_t kAccumulatorBudget = 96 * 1024;
// Fewest rows a forward block is given: below it a block's fixed costs dominate.
constexpr int64_t kMinRowsPerBlock = 256;
// Bytes of per-block partials the last block of a slice reads: bounds the serial tail.
constexpr size_t kFusedReduceBytes = 512 * 1024;
constexpr size_t kJointReduceBytes = 16 * 1024 * 1024;
// The backward stages a slice's grad tables in shared memory up to this size.
constexpr size_t kStagedTableBudget = 32 * 1024;
constexpr int kBackwardThreads = 256;
// lu_finish_kernel (library LU path): threads, and table entries per block.
constexpr int kFinishThreads = 256;
constexpr int64_t kFinishEntriesPerBlock = 8192;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

inline int tile_rows(int64_t C, int64_t rows_needed) {
  int64_t r = kTileElements / C;
  r = r < 1 ? 1 : (r > kMaxTileRows ? kMaxTileRows : r);
  return static_cast<int>(r < rows_needed ? r : (rows_needed < 1 ? 1 : rows_needed));
}

// Lanes that share one row: a power of two up to a warp, about four columns per lane, so small C
// keeps most lanes busy and no lane holds a long row.
DMI_PLAN_HD inline int lanes_per_row(int C) {
  const int want = (C + 3) / 4;
  int lanes = 1;
  while (lanes < want && lanes < 32) lanes *= 2;
  return lanes;
}

// The device's limits (cudaDeviceProp), with the driver's fixed ones as defaults.
struct DeviceLimits {
  int multiprocessors = 1;
  int max_threads_per_block = 1024;
  int64_t max_grid_x = 2147483647;
  int64_t max_grid_yz = 65535;
  size_t smem_per_block = 48 * 1024;  // static + dynamic without the opt-in
  size_t smem_per_block_optin = 48 * 1024;
  size_t smem_per_multiprocessor = 48 * 1024;
  size_t reserved_smem_per_block = 0;  // the driver's own, per resident block
  int max_threads_per_multiprocessor = 2048;
  int max_blocks_per_multiprocessor = 32;
  int registers_per_multiprocessor = 65536;
};

// One kernel's limits (cudaFuncGetAttributes), queried once per device.
struct KernelInfo {
  size_t static_smem = 0;  // sharedSizeBytes
  int registers = 0;       // numRegs, per thread
  int max_threads = 1024;  // maxThreadsPerBlock
};

// The largest dynamic shared memory a launch of the kernel may ask for (after the opt-in).
inline size_t max_dynamic_smem(const KernelInfo& k, const DeviceLimits& d) {
  return d.smem_per_block_optin > k.static_smem ? d.smem_per_block_optin - k.static_smem : 0;
}

// Resident blocks per multiprocessor (the occupancy calculator's answer from threads, registers
// and shared memory; register allocation rounded to 256 per warp). At least 1 for a launchable
// block.
inline int64_t blocks_per_multiprocessor(const KernelInfo& k, const DeviceLimits& d, int threads,
                                         size_t dynamic_smem) {
  const int64_t warps = (threads + 31) / 32;
  int64_t n = std::min<int64_t>(d.max_blocks_per_multiprocessor,
                                d.max_threads_per_multiprocessor / std::max(threads, 1));
  const int64_t regs_per_warp = (static_cast<int64_t>(k.registers) * 32 + 255) / 256 * 256;
  if (regs_per_warp > 0) n = std::min<int64_t>(n, d.registers_per_multiprocessor / (regs_per_warp * warps));
  const size_t per_block = k.static_smem + dynamic_smem + d.reserved_smem_per_block;
  if (per_block > 0) n = std::min<int64_t>(n, static_cast<int64_t>(d.smem_per_multiprocessor / per_block));
  return std::max<int64_t>(n, 1);
}

// Whether a block of the kernel with this dynamic shared memory can be launched at all.
inline bool fits_block(const KernelInfo& k, const DeviceLimits& d, int threads, size_t dynamic_smem) {
  return threads <= d.max_threads_per_block && threads <= k.max_threads &&
         dynamic_smem <= max_dynamic_smem(k, d);
}

// ---- the forward kernel (joint_cuda.cu)

struct ForwardShape {
  int64_t slices, sources, rows, classes;
  size_t acc_size;  // bytes of the accumulation type of the input (float or double)
  bool fused;       // the LU stage in the same launch
};

struct ForwardPlan {
  std::string error;  // non-empty: the shape cannot be launched on this device (and why)
  int threads = 0;
  int64_t chunks = 0;  // blocks per slice
  int64_t blocks = 0;  // gridDim.x = slices * chunks
  int groups = 0;      // private accumulators per block
  bool acc_in_shared = false;
  int tile_rows = 0, lanes = 0;
  size_t off_count = 0, off_poison = 0, off_labels = 0, off_tile = 0;
  size_t smem = 0;  // dynamic shared memory
};

inline ForwardPlan plan_forward(const ForwardShape& s, int threads, const KernelInfo& k,
                                const DeviceLimits& d) {
  const int64_t S = s.slices, M = s.sources, N = s.rows, C = s.classes;
  const size_t matrices_bytes = static_cast<size_t>(M * C * C) * sizeof(double);
  const size_t allowed = max_dynamic_smem(k, d);
  ForwardPlan plan;
  plan.threads = threads;
  plan.lanes = lanes_per_row(static_cast<int>(C));
  const int64_t groups_by_threads = C <= threads ? threads / C : 1;
  const int64_t groups_by_memory = static_cast<int64_t>(kAccumulatorBudget / matrices_bytes);
  plan.acc_in_shared = groups_by_memory >= 1;
  plan.groups = static_cast<int>(plan.acc_in_shared ? std::min(groups_by_threads, groups_by_memory) : 1);
  const int64_t label_rows = std::max<int64_t>(1, static_cast<int64_t>(kLabelBudget / (sizeof(int) * M)));
  const size_t stage = s.fused ? static_cast<size_t>(C * C) * sizeof(double) : 0;

  auto layout_smem = [&](int rows) {
    plan.tile_rows = rows;
    size_t off = plan.acc_in_shared ? align16(plan.groups * matrices_bytes) : 0;
    plan.off_count = off;
    off += align16(static_cast<size_t>(plan.groups * M) * sizeof(int64_t));
    plan.off_poison = off;
    off += align16(static_cast<size_t>(M) * sizeof(int));
    plan.off_labels = off;
    off += align16(static_cast<size_t>(M * rows) * sizeof(int));
    plan.off_tile = off;
    off += align16(static_cast<size_t>(rows * C) * s.acc_size);
    plan.smem = std::max(off, stage);
  };
  // The largest layout that fits the device: fewer private accumulators, then the accumulators in
  // the workspace, then shorter tiles.
  auto fit = [&](int64_t rows_wanted) {
    int rows = static_cast<int>(std::min<int64_t>(tile_rows(C, rows_wanted), label_rows));
    layout_smem(rows);
    while (plan.smem > allowed && plan.acc_in_shared && plan.groups > 1) {
      plan.groups = std::max(1, plan.groups / 2);
      layout_smem(rows);
    }
    if (plan.smem > allowed && plan.acc_in_shared) {
      plan.acc_in_shared = false;
      plan.groups = 1;
      layout_smem(rows);
    }
    while (plan.smem > allowed && rows > 1) {
      rows = std::max(1, rows / 2);
      layout_smem(rows);
    }
  };
  fit(N);
  if (!fits_block(k, d, threads, plan.smem)) {
    plan.error = "dmi_ext: the CUDA forward for C = " + std::to_string(C) + " classes and M = " +
                 std::to_string(M) + " label sources needs " + std::to_string(plan.smem) +
                 " bytes of shared memory per block (" + std::to_string(threads) +
                 " threads); this device allows " + std::to_string(allowed) +
                 " next to the kernel's static " + std::to_string(k.static_smem);
    return plan;
  }
  const int64_t per_sm = blocks_per_multiprocessor(k, d, threads, plan.smem);
  const int64_t by_occupancy = std::max<int64_t>(1, d.multiprocessors * per_sm / S);
  const int64_t by_rows = std::max<int64_t>(1, N / kMinRowsPerBlock);
  const int64_t by_reduce = std::max<int64_t>(
      1, static_cast<int64_t>((s.fused ? kFusedReduceBytes : kJointReduceBytes) / matrices_bytes));
  const int64_t by_grid = std::max<int64_t>(1, d.max_grid_x / S);
  plan.chunks = std::min({by_occupancy, by_rows, by_reduce, by_grid});
  fit(ceil_div(N, plan.chunks));  // shorter chunks need no larger tiles than their rows
  plan.blocks = S * plan.chunks;
  if (plan.blocks > d.max_grid_x) {
    plan.error = "dmi_ext: the CUDA forward cannot launch " + std::to_string(S) +
                 " input slices (batch size B): the grid allows " + std::to_string(d.max_grid_x);
  }
  return plan;
}

// ---- the backward kernel (backward_cuda.cu)

struct BackwardShape {
  int64_t slices, sources, rows, classes;
  size_t acc_size;
};

struct BackwardPlan {
  std::string error;
  int threads = kBackwardThreads;
  int tile_rows = 0, lanes = 0;
  bool stage_table = false;
  size_t off_labels = 0, off_tile = 0, smem = 0;
  int64_t blocks = 0;
};

inline BackwardPlan plan_backward(const BackwardShape& s, const KernelInfo& k, const DeviceLimits& d) {
  const int64_t S = s.slices, M = s.sources, N = s.rows, C = s.classes;
  const size_t allowed = max_dynamic_smem(k, d);
  BackwardPlan plan;
  plan.lanes = lanes_per_row(static_cast<int>(C));
  const int64_t label_rows = std::max<int64_t>(1, static_cast<int64_t>(kLabelBudget / (sizeof(int) * M)));
  const size_t table_bytes = static_cast<size_t>(M * C * C) * sizeof(double);
  // Staging pays when the table is small and each of its rows serves several input rows.
  plan.stage_table = table_bytes <= kStagedTableBudget && N >= 2 * C;
  auto layout = [&](int rows) {
    plan.tile_rows = rows;
    size_t off = plan.stage_table ? align16(table_bytes) : 0;
    plan.off_labels = off;
    off += align16(static_cast<size_t>(M * rows) * sizeof(int));
    plan.off_tile = off;
    off += align16(static_cast<size_t>(rows * C) * s.acc_size);
    plan.smem = off;
  };
  int rows = static_cast<int>(std::min<int64_t>(tile_rows(C, N), label_rows));
  layout(rows);
  if (plan.smem > allowed && plan.stage_table) {
    plan.stage_table = false;
    layout(rows);
  }
  while (plan.smem > allowed && rows > 1) {
    rows = std::max(1, rows / 2);
    layout(rows);
  }
  if (!fits_block(k, d, plan.threads, plan.smem)) {
    plan.error = "dmi_ext: the CUDA backward for C = " + std::to_string(C) + " classes and M = " +
                 std::to_string(M) + " label sources needs " + std::to_string(plan.smem) +
                 " bytes of shared memory per block; this device allows " + std::to_string(allowed) +
                 " next to the kernel's static " + std::to_string(k.static_smem);
    return plan;
  }
  const int64_t tiles = S * ceil_div(N, plan.tile_rows);
  const int64_t resident =
      d.multiprocessors * blocks_per_multiprocessor(k, d, plan.threads, plan.smem);
  plan.blocks = std::min({tiles, resident, d.max_grid_x});  // a persistent grid: one full wave
  return plan;
}

// ---- the LU stage as its own launch (lu_cuda.cu): one block per matrix, C x C doubles staged.

struct LuPlan {
  std::string error;
  int threads = 0;
  int64_t blocks = 0;
  size_t smem = 0;
};

inline LuPlan plan_lu(int64_t matrices, int64_t C, int threads, const KernelInfo& k,
                      const DeviceLimits& d) {
  LuPlan plan;
  plan.threads = threads;
  plan.blocks = matrices;
  plan.smem = static_cast<size_t>(C * C) * sizeof(double);
  if (!fits_block(k, d, threads, plan.smem)) {
    plan.error = "dmi_ext: the in-kernel LU of C = " + std::to_string(C) + " classes needs " +
                 std::to_string(plan.smem) + " bytes of shared memory; this device allows " +
                 std::to_string(max_dynamic_smem(k, d));
  } else if (matrices > d.max_grid_x) {
    plan.error = "dmi_ext: " + std::to_string(matrices) + " matrices exceed one launch's grid";
  }
  return plan;
}

// lu_finish_kernel: chunks of kFinishEntriesPerBlock table entries per matrix, all in gridDim.x
// (gridDim.y would stop at 65535 matrices).
struct FinishPlan {
  std::string error;
  int64_t chunks_per_matrix = 0;
  int64_t blocks = 0;
};

inline FinishPlan plan_finish(int64_t matrices, int64_t C, const DeviceLimits& d) {
  FinishPlan plan;
  plan.chunks_per_matrix = ceil_div(C * C, kFinishEntriesPerBlock);
  plan.blocks = matrices * plan.chunks_per_matrix;
  if (plan.blocks > d.max_grid_x) {
    plan.error = "dmi_ext: " + std::to_string(matrices) + " matrices of C = " + std::to_string(C) +
                 " exceed one launch's grid";
  }
  return plan;
}

}  // namespace dmi_ext::cuda
