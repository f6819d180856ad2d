// Stage 2 on the GPU, inside a kernel: log|det U|, the singular flag and the grad table
// -w s U^{-T} of one C x C matrix (C <= kFusedMaxClasses) by one thread block, in float64.
//
// The factorisation is Gauss-Jordan with partial pivoting, in place: step k picks the row p with
// the largest |U[p, k]| among the rows not yet pivoted (exactly the pivot and the pivot value of
// LU with partial pivoting, since the rows not yet pivoted hold LU's Schur complement, updated
// with LU's own formula), and also eliminates above the pivot, so after C steps the matrix holds
// the inverse, permuted, with no triangular solves. log|det U| = sum log|pivot| (docs/contract.md §3). U is
// first equilibrated by powers of two and a pivot with |pivot| <= pivot_tolerance(C) means U is
// singular: the singular rule of csrc/dmi_math.h, the CPU op's and the reference's (docs/contract.md §5). A
// NaN entry wins the pivot search, so a NaN in U gives a NaN log|det|, never a spurious
// "singular".
//
// The matrix lives in registers: thread (ty, tx) of a TY x TX grid holds rows ty + TY*i and
// columns tx + TX*j. A step publishes the pivot column and the pivot row through shared memory
// (double-buffered by step parity, two barriers per step) and every warp finds the pivot on its
// own from the published column, so the pivot needs no extra broadcast.
#pragma once

#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "../dmi.h"
#include "../dmi_math.h"

namespace dmi_ext::cuda {

// The thread grid and register tile of one matrix size class; C <= TY * RPT = TX * CPT.
template <int TY_, int TX_, int RPT_, int CPT_>
struct InverseLayout {
  static constexpr int TY = TY_, TX = TX_, RPT = RPT_, CPT = CPT_;
  static constexpr int kThreads = TY * TX;
  static constexpr int kMaxClasses = TY * RPT;
  static_assert(TY * RPT == TX * CPT, "square coverage");
  static_assert(kThreads % 32 == 0, "whole warps");
};
using InverseUpTo32 = InverseLayout<16, 16, 2, 2>;
using InverseUpTo64 = InverseLayout<16, 16, 4, 4>;
using InverseUpTo128 = InverseLayout<16, 32, 8, 4>;
static_assert(InverseUpTo128::kMaxClasses == kFusedMaxClasses, "the fused limit is the largest layout");

struct InverseShared {
  double col[2][kFusedMaxClasses];  // pivot column of step k, buffer k & 1
  double row[2][kFusedMaxClasses];  // pivot row of step k
  int pivot_row[kFusedMaxClasses];  // p_k: the row pivoted at step k
  int step_of_row[kFusedMaxClasses];  // its inverse: the step at which row r was pivoted
  int row_exponent[kFusedMaxClasses];  // the singular rule's equilibration: rows by 2^r[t]
  int col_exponent[kFusedMaxClasses];  // then columns by 2^c[k]
  double logabsdet;
  int singular;
  int table_flags;  // kTableInf | kTableNaN, from every thread's share of the table
};

// Where a matrix's entries come from: entry e of U is the sum of base[j * stride + e] over
// j < count, in j order (private accumulators or per-block partials, summed in a fixed order).
// `other_blocks`: written by other blocks of this launch, so read past the (incoherent) L1.
struct MatrixSource {
  const double* base;
  int64_t stride;
  int64_t count;
  bool other_blocks;

  __device__ double entry(int64_t e) const {
    double s = 0.0;
    for (int64_t j = 0; j < count; ++j) {
      s += other_blocks ? __ldcg(base + j * stride + e) : base[j * stride + e];
    }
    return s;
  }
};

struct InverseResult {
  double logabsdet;  // -inf if singular
  bool singular;
};

// Factorises U = scale * source (NaN everywhere if poisoned) and writes table[j * C + k] =
// -w * scale * inverse(U)[k, j], zero if U is singular. All threads of the block call it with the
// same arguments; `stage` is shared memory of at least C * C doubles that nothing else uses
// meanwhile (it may hold the source: the source is read before the first barrier). Returns the
// same result in every thread, and ends with a barrier.
template <class Layout>
__device__ InverseResult invert_matrix(const MatrixSource& source, int C, double scale,
                                       bool poisoned, double log_eps, double* stage,
                                       InverseShared& sh, double* __restrict__ table) {
  constexpr int TY = Layout::TY, TX = Layout::TX, RPT = Layout::RPT, CPT = Layout::CPT;
  const int tid = threadIdx.x, ty = tid % TY, tx = tid / TY, lane = tid & 31;
  const double nan = __longlong_as_double(0x7ff8000000000000LL);

  double a[RPT][CPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const int r = ty + TY * i, c = tx + TX * j;
      a[i][j] = 0.0;
      if (r < C && c < C) a[i][j] = poisoned ? nan : scale * source.entry(r * C + c);
    }
  }
  // The equilibration of the singular rule (dmi_math.h), as lu_cpu.cpp does it: each row divided
  // by the power of two that puts its largest |entry| in [1, 2), then each column of the result
  // likewise. Through `stage`, once every thread has read the source.
  __syncthreads();
  auto publish = [&] {
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int r = ty + TY * i, c = tx + TX * j;
        if (r < C && c < C) stage[r * C + c] = a[i][j];
      }
    }
    __syncthreads();
  };
  // The exponent of each row's (line_stride C, step 1) or column's (line_stride 1, step C)
  // largest |entry| in the staged matrix.
  auto line_exponents = [&](int line_stride, int step, int* exponent) {
    for (int t = tid; t < C; t += blockDim.x) {
      double m = 0.0;
      for (int k = 0; k < C; ++k) {
        const double v = fabs(stage[t * line_stride + k * step]);
        m = v > m ? v : m;
      }
      exponent[t] = scale_exponent(m);
    }
    __syncthreads();
  };
  publish();
  line_exponents(C, 1, sh.row_exponent);
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int r = ty + TY * i;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      if (r < C) a[i][j] = times_pow2(a[i][j], -sh.row_exponent[r]);
    }
  }
  publish();
  line_exponents(1, C, sh.col_exponent);
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    const int c = tx + TX * j;
    const int e = c < C ? sh.col_exponent[c] : 0;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      if (e != 0) a[i][j] = times_pow2(a[i][j], -e);
    }
  }
  const double tolerance = pivot_tolerance(C);

  unsigned pivoted = 0;  // bit m: row lane + 32 m has been pivoted (rows as the search sees them)
  double logabsdet = 0.0;  // summed by thread 0, in step order like the CPU
  bool singular = false;
  for (int k = 0; k < C; ++k) {
    double* col = sh.col[k & 1];
    double* row = sh.row[k & 1];
    // 1. The owners of column k publish it.
    if (tx == k % TX) {
      const int jk = k / TX;
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        double v = 0.0;
#pragma unroll
        for (int j = 0; j < CPT; ++j) v = j == jk ? a[i][j] : v;  // no run-time register index
        const int r = ty + TY * i;
        if (r < C) col[r] = v;
      }
    }
    __syncthreads();
    // 2. Every warp finds the pivot: the largest |col[r]| over rows not yet pivoted, NaN largest,
    // ties to the lowest row. The order is total, so all lanes of all warps agree.
    double best = -1.0;
    int best_row = INT_MAX;
#pragma unroll
    for (int m = 0; m < kFusedMaxClasses / 32; ++m) {
      const int r = lane + 32 * m;
      if (r < C && !((pivoted >> m) & 1u)) {
        const double v = fabs(col[r]);
        const double key = v != v ? INFINITY : v;
        if (key > best) {
          best = key;
          best_row = r;
        }
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const double other = __shfl_xor_sync(0xffffffffu, best, off);
      const int other_row = __shfl_xor_sync(0xffffffffu, best_row, off);
      if (other > best || (other == best && other_row < best_row)) {
        best = other;
        best_row = other_row;
      }
    }
    const int p = best_row;
    const double pivot = col[p];
    if (fabs(pivot) <= tolerance) {  // the singular rule (NaN passes: it reaches the loss)
      singular = true;
      break;
    }
    const double inv = 1.0 / pivot;  // the one division of the step
    if ((p & 31) == lane) pivoted |= 1u << (p >> 5);
    if (tid == 0) {
      sh.pivot_row[k] = p;
      sh.step_of_row[p] = k;
      logabsdet += log(fabs(pivot));
    }
    // 3. The owners of row p publish it divided by the pivot (before their update below).
    if (ty == p % TY) {
      const int ip = p / TY;
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        double v = 0.0;
#pragma unroll
        for (int i = 0; i < RPT; ++i) v = i == ip ? a[i][j] : v;
        const int c = tx + TX * j;
        if (c < C) row[c] = v * inv;
      }
    }
    __syncthreads();
    // 4. Eliminate column k from every row but p, scale row p: the row operations of lu_cpu.cpp
    // (pivot row times 1/pivot, 1/pivot in column k; row r minus A[r, k] times the scaled pivot
    // row, -A[r, k]/pivot in column k). The pivot row is re-read from shared memory (a broadcast)
    // rather than held in registers: the 128-class layout needs them all.
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int r = ty + TY * i;
      if (r >= C) continue;
      const double f = col[r];
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int c = tx + TX * j;
        if (c >= C) continue;
        const double pivot_row_c = row[c];
        if (r == p) {
          a[i][j] = c == k ? inv : pivot_row_c;
        } else {
          a[i][j] = c == k ? -f * inv : a[i][j] - f * pivot_row_c;
        }
      }
    }
  }
  if (tid == 0) {
    sh.singular = singular;
    sh.table_flags = 0;
    int exponents = 0;
    for (int t = 0; t < C; ++t) exponents += sh.row_exponent[t] + sh.col_exponent[t];
    sh.logabsdet = singular ? -INFINITY : logabsdet + exponents * kLn2;
  }
  __syncthreads();
  const InverseResult result{sh.logabsdet, sh.singular != 0};
  if (result.singular) {
    for (int e = tid; e < C * C; e += blockDim.x) table[e] = 0.0;
  } else {
    // The array now holds S with inverse(U)[i, j] = S[p_i, q_j] (p_i: row pivoted at step i, q_j:
    // step at which row j was pivoted). table[j, k] = f * inverse(U)[k, j], so the entry
    // S[r, c] goes to table[p_c, q_r]; staged in shared memory so the table is written coalesced.
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int r = ty + TY * i, c = tx + TX * j;
        if (r < C && c < C) stage[sh.pivot_row[c] * C + sh.step_of_row[r]] = a[i][j];
      }
    }
    __syncthreads();
    const double f = -det_weight(result.logabsdet, log_eps) * scale;
    // U^-1[k][t] = A^-1[k][t] / 2^(c[k] + r[t]) undoes the equilibration.
    int flags = 0;
    for (int e = tid; e < C * C; e += blockDim.x) {
      const int t = e / C, k = e - t * C;
      const double v = f * times_pow2(stage[e], -(sh.col_exponent[k] + sh.row_exponent[t]));
      table[e] = v;
      flags |= table_entry_flags(v);
    }
    if (flags != 0) atomicOr(&sh.table_flags, flags);
    __syncthreads();
    if (table_overflowed(sh.table_flags)) {  // U^-1 beyond float64: gradient 0, as on the CPU
      for (int e = tid; e < C * C; e += blockDim.x) table[e] = 0.0;
    }
  }
  __syncthreads();
  return result;
}

}  // namespace dmi_ext::cuda
