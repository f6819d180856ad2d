// The launch planner (csrc/cuda/launch_plan.h) over a wide grid of shapes, dtypes, kernels and
// devices, each plan checked against the driver's launch rules as written here (independently of
// the planner) and against the shared memory layout the kernels index. A shape the planner
// rejects must say why; on the data-centre devices (H100/H200, A100) every shape with at most
// 1000 label sources must be accepted. No GPU needed: run by tests/cuda_emulation/run.py.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda/launch_plan.h"

using namespace dmi_ext::cuda;

namespace {

struct Device {
  const char* name;
  DeviceLimits limits;
  bool must_accept;  // every shape with M <= 1000 launches
};

DeviceLimits limits(int sms, size_t optin, size_t per_sm, int threads_per_sm, int blocks_per_sm) {
  DeviceLimits d;
  d.multiprocessors = sms;
  d.smem_per_block = 48 * 1024;
  d.smem_per_block_optin = optin;
  d.smem_per_multiprocessor = per_sm;
  d.reserved_smem_per_block = 1024;
  d.max_threads_per_multiprocessor = threads_per_sm;
  d.max_blocks_per_multiprocessor = blocks_per_sm;
  return d;
}

long long checked = 0, accepted = 0, rejected = 0, failures = 0;

void fail(const std::string& what, const std::string& shape) {
  if (++failures <= 20) std::fprintf(stderr, "FAIL %s: %s\n", shape.c_str(), what.c_str());
}

// The driver's rules for one launch (the planner raised the attribute to optin - static).
std::string launch_error(int threads, int64_t grid_x, size_t dynamic, const KernelInfo& k,
                         const DeviceLimits& d) {
  const size_t attribute = d.smem_per_block_optin - k.static_smem;
  if (threads < 1 || threads > 1024 || threads > k.max_threads) return "threads per block";
  if (grid_x < 1 || grid_x > 2147483647LL) return "gridDim.x";
  if (k.static_smem + dynamic > d.smem_per_block_optin) return "static + dynamic above optin";
  if (k.static_smem + dynamic > d.smem_per_block && dynamic > attribute) return "above 48 KB without opt-in";
  return "";
}

void check_forward(const ForwardShape& s, int threads, const KernelInfo& k, const Device& dev,
                   const std::string& shape) {
  ++checked;
  const ForwardPlan p = plan_forward(s, threads, k, dev.limits);
  if (!p.error.empty()) {
    ++rejected;
    if (p.error.find("C = ") == std::string::npos) fail("rejection without the shape: " + p.error, shape);
    if (dev.must_accept && s.sources <= 1000) fail("rejected: " + p.error, shape);
    return;
  }
  ++accepted;
  const std::string e = launch_error(p.threads, p.blocks, p.smem, k, dev.limits);
  if (!e.empty()) fail("forward launch: " + e, shape);
  const int64_t M = s.sources, C = s.classes;
  if (p.chunks < 1 || p.blocks != s.slices * p.chunks) fail("forward grid", shape);
  if (p.chunks > 1 && s.rows / p.chunks < 1) fail("a block without rows", shape);
  if (p.groups < 1 || p.tile_rows < 1 || p.lanes < 1 || p.lanes > 32) fail("forward geometry", shape);
  if (p.acc_in_shared && p.off_count < static_cast<size_t>(p.groups * M * C * C) * 8) fail("accumulators overlap", shape);
  if (p.off_poison < p.off_count + static_cast<size_t>(p.groups * M) * 8) fail("counts overlap", shape);
  if (p.off_labels < p.off_poison + static_cast<size_t>(M) * 4) fail("poison overlaps", shape);
  if (p.off_tile < p.off_labels + static_cast<size_t>(M * p.tile_rows) * 4) fail("labels overlap", shape);
  if (p.smem < p.off_tile + static_cast<size_t>(p.tile_rows * C) * s.acc_size) fail("tile past the end", shape);
  if (s.fused && p.smem < static_cast<size_t>(C * C) * 8) fail("LU stage past the end", shape);
  if (p.off_tile % 16 || p.off_labels % 16 || p.off_count % 16) fail("alignment", shape);
}

void check_backward(const BackwardShape& s, const KernelInfo& k, const Device& dev, const std::string& shape) {
  ++checked;
  const BackwardPlan p = plan_backward(s, k, dev.limits);
  if (!p.error.empty()) {
    ++rejected;
    if (dev.must_accept && s.sources <= 1000) fail("backward rejected: " + p.error, shape);
    return;
  }
  ++accepted;
  const std::string e = launch_error(p.threads, p.blocks, p.smem, k, dev.limits);
  if (!e.empty()) fail("backward launch: " + e, shape);
  const int64_t M = s.sources, C = s.classes;
  if (p.stage_table && p.off_labels < static_cast<size_t>(M * C * C) * 8) fail("staged table overlaps", shape);
  if (p.off_tile < p.off_labels + static_cast<size_t>(M * p.tile_rows) * 4) fail("backward labels overlap", shape);
  if (p.smem < p.off_tile + static_cast<size_t>(p.tile_rows * C) * s.acc_size) fail("backward tile past the end", shape);
}

void check_lu(int64_t G, int64_t C, const KernelInfo& k, const Device& dev, const std::string& shape) {
  ++checked;
  if (C <= 128) {
    const int threads = C <= 64 ? 256 : 512;
    const LuPlan p = plan_lu(G, C, threads, k, dev.limits);
    if (!p.error.empty()) {
      ++rejected;
      if (dev.must_accept) fail("LU rejected: " + p.error, shape);
      return;
    }
    ++accepted;
    const std::string e = launch_error(p.threads, p.blocks, p.smem, k, dev.limits);
    if (!e.empty()) fail("LU launch: " + e, shape);
    return;
  }
  const FinishPlan p = plan_finish(G, C, dev.limits);
  if (!p.error.empty()) {
    ++rejected;
    if (dev.must_accept) fail("finish rejected: " + p.error, shape);
    return;
  }
  ++accepted;
  const std::string e = launch_error(kFinishThreads, p.blocks, 0, k, dev.limits);
  if (!e.empty()) fail("finish launch: " + e, shape);
  if (p.chunks_per_matrix * kFinishEntriesPerBlock < C * C) fail("finish covers the table", shape);
}

}  // namespace

int main() {
  const std::vector<Device> devices = {
      {"H100", limits(132, 232448, 233472, 2048, 32), true},
      {"H200", limits(132, 232448, 233472, 2048, 32), true},
      {"A100", limits(108, 166912, 167936, 2048, 32), true},
      {"RTX3090", limits(82, 101376, 102400, 1536, 16), false},
      {"T4", limits(40, 65536, 65536, 1024, 16), false},
  };
  std::vector<int64_t> rows = {1, 2, 3, 7, 31, 100, 255, 256, 257, 330, 1000, 4095, 4096, 5000,
                               10000, 65535, 65536, 100000, 1000000, 4000000};
  std::vector<int64_t> classes;
  for (int64_t c = 2; c <= 40; ++c) classes.push_back(c);
  for (int64_t c : {48, 63, 64, 65, 74, 75, 76, 77, 78, 96, 100, 127, 128, 129, 150, 200, 255, 256,
                    257, 300, 500, 512, 999, 1000})
    classes.push_back(c);
  // (B, M): batched problems, or label sources over one input.
  std::vector<std::pair<int64_t, int64_t>> matrices = {{1, 1},    {2, 1},     {3, 1},     {8, 1},
                                                       {256, 1},  {1024, 1},  {65535, 1}, {65536, 1},
                                                       {100000, 1}, {1, 2},   {1, 3},     {1, 8},
                                                       {1, 64},   {1, 1000},  {1, 10000}, {1, 100000}};
  // Static shared memory of the kernel (ptxas: about 5-7 KB for the fused forward), and registers.
  const std::vector<size_t> statics = {0, 5504, 8192};
  for (const Device& dev : devices) {
    for (size_t st : statics) {
      for (int regs : {32, 128}) {
        const KernelInfo k{st, regs, 1024};
        for (int64_t C : classes) {
          for (auto [B, M] : matrices) {
            for (int64_t N : rows) {
              if (B * N > 400000000LL || M * N > 400000000LL) continue;  // beyond any device's memory
              for (size_t acc : {size_t{4}, size_t{8}}) {
                char shape[200];
                std::snprintf(shape, sizeof shape, "%s static=%zu regs=%d B=%lld M=%lld N=%lld C=%lld acc=%zu",
                              dev.name, st, regs, (long long)B, (long long)M, (long long)N, (long long)C, acc);
                check_forward({B, M, N, C, acc, false}, 256, k, dev, shape);
                if (C <= 128) check_forward({B, M, N, C, acc, true}, C <= 64 ? 256 : 512, k, dev, shape);
                check_backward({B, M, N, C, acc}, k, dev, shape);
              }
            }
            check_lu(B * M, C, k, dev, std::string(dev.name) + " LU G=" + std::to_string(B * M) + " C=" + std::to_string(C));
          }
        }
      }
    }
  }
  std::printf("[plan-test] %lld plans checked against the launch rules: %lld accepted, %lld rejected "
              "with a reason; %lld failure(s)\n", checked, accepted, rejected, failures);
  return failures ? 1 : 0;
}
