// What one block of the fused CUDA kernel does, as host-and-device code, for any rule
// (rules/rule.h). `RuleKernel<Rule, kPresent>` (kPresent: which optional states the call carries)
// has three parts: `Meta`, the launch's parameter struct; `consts`, run once per block (by thread
// 0 on the device), which computes the tensor's per-step constants from its group's hyper-table
// row and advances the step when the block owns it; and `update`, run by every thread on its
// share of the block's chunk with the rule's per-element math.
//
// fused_optim.cu wraps them in one CUDA kernel template. The CPU tests run the same parts on the
// host, block after block and thread after thread (tests/cuda_emulator.cpp), against torch.optim.
//
// A measured step (fused_op.h's Stat columns) adds no floating-point atomics, so its figures are
// the same bits on every run: each thread sums its elements, each block sums its threads in a
// fixed tree (`BlockSum`) into its own row of a scratch table (`BlockStats`), and a second small
// kernel sums each group's rows in a fixed order into `stats` (`group_share`, then `BlockSum`).
#pragma once

#include <ATen/OpMathType.h>

#include "../fused_op.h"
#include "../rules/all.h"
#include "launch_plan.h"

namespace lrfuse::cuda {

// found_inf set (GradScaler saw an inf or NaN): nothing is written, no step advances.
LRFUSE_HD bool skip_step(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

// One row per block of a measured call: the block's Stat sums, then its group's row of `hyper`
// (a double holds any row number exactly).
struct BlockStats {
  static constexpr int kGroup = kStatColumns;
  static constexpr int kWidth = kStatColumns + 1;
};

// A thread's Stat sums over its elements, in the math type (a thread sums at most
// kChunkSize / kBlockSize = 128 terms; blocks and groups add up in double).
template <typename opmath_t>
struct ThreadStats {
  opmath_t v[kStatColumns] = {};

  LRFUSE_HD void add(opmath_t before, opmath_t after, opmath_t grad) {
    const opmath_t d = after - before;  // exact when below the weight
    v[kUpdateSq] += d * d;
    v[kParamSq] += before * before;
    v[kGradSq] += grad * grad;
    v[kNonfinite] += grad - grad != opmath_t(0) ? opmath_t(1) : opmath_t(0);  // inf - inf and NaN - NaN are NaN
  }
};

// The order in which a block's kBlockSize threads' sums are added, the same on the device and in
// the host tests: within each warp of 32 a halving tree (lane i += lane i + offset, offset 16, 8,
// 4, 2, 1, as __shfl_down_sync computes it), then the warps' sums in warp order.
struct BlockSum {
  static constexpr int kWarp = 32;
  static constexpr int kWarps = kBlockSize / kWarp;
  static_assert(kBlockSize % kWarp == 0, "whole warps");

  // Host: `v` holds every thread's sums (kBlockSize rows); the block's sums come back.
  static void host(double (*v)[kStatColumns], double (&out)[kStatColumns]) {
    for (int k = 0; k < kStatColumns; ++k) out[k] = 0.0;
    for (int w = 0; w < kWarps; ++w) {
      double(*lane)[kStatColumns] = v + w * kWarp;
      for (int offset = kWarp / 2; offset > 0; offset /= 2)
        for (int i = 0; i < offset; ++i)
          for (int k = 0; k < kStatColumns; ++k) lane[i][k] += lane[i + offset][k];
      for (int k = 0; k < kStatColumns; ++k) out[k] += lane[0][k];
    }
  }

#if defined(__CUDACC__)
  // Device: every thread of the block calls it with its sums; thread 0 gets the block's.
  static __device__ void device(double (&v)[kStatColumns]) {
    __shared__ double warp_sums[kWarps][kStatColumns];
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
      for (int k = 0; k < kStatColumns; ++k) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    if (lane == 0)
      for (int k = 0; k < kStatColumns; ++k) warp_sums[warp][k] = v[k];
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int k = 0; k < kStatColumns; ++k) v[k] = 0.0;
      for (int w = 0; w < kWarps; ++w)
        for (int k = 0; k < kStatColumns; ++k) v[k] += warp_sums[w][k];
    }
  }
#endif
};

// Thread `thread` of `threads` of the reduction of group `group`: its share of the `rows` block
// rows, in row order.
LRFUSE_HD void group_share(const double* rows, int64_t nrows, int group, int thread, int threads,
                           double (&v)[kStatColumns]) {
  for (int64_t r = thread; r < nrows; r += threads) {
    const double* row = rows + r * BlockStats::kWidth;
    if (row[BlockStats::kGroup] == group)
      for (int k = 0; k < kStatColumns; ++k) v[k] += row[k];
  }
}

// Operands: param, grad, then the states present, in the rule's order (absent ones take no slot).
template <typename Rule, unsigned kPresent>
struct RuleKernel {
  static constexpr int kStates = num_states<Rule>();

  static constexpr int count_present() {
    int n = 0;
    for (int k = 0; k < kStates; ++k) n += state_present<Rule>(kPresent, k);
    return n;
  }

  // The operand slot of state k (meaningful when present).
  static constexpr int slot(int k) {
    int at = 2;
    for (int j = 0; j < k; ++j) at += state_present<Rule>(kPresent, j);
    return at;
  }

  static constexpr int kDepth = 2 + count_present();
  using Meta = TensorListMeta<kDepth>;
  static_assert(sizeof(Meta) + sizeof(Common) <= kParamBudget + 64, "kernel parameters too large");

  template <typename scalar_t>
  struct Block {
    using opmath_t = at::opmath_type<scalar_t>;
    using Meta = RuleKernel::Meta;
    using Consts = typename Rule::template Consts<opmath_t>;

    static LRFUSE_HD Consts consts(const Meta& meta, const Common& common, int block) {
      const int t = meta.block_tensor[block];
      float step = 0.0f;
      if constexpr (Rule::kCountsSteps) {
        step = *meta.step[t] + 1.0f;  // as torch: the step counts this update
        if (block_owns_step(meta.numel[t])) *meta.step[t] = step;
      }
      return Rule::template consts<opmath_t>(common.hyper + meta.group[t] * Rule::kColumns, step);
    }

    // The thread's share of the block's update; in a measured call (common.block_stats set) it
    // also returns the thread's Stat sums (zeros otherwise).
    static LRFUSE_HD ThreadStats<opmath_t> update(const Meta& meta, const Common& common, int block, int thread,
                                                  int threads, const Consts c) {
      const Extent e = block_extent(meta, block);
      scalar_t* ptr[kDepth];
      LRFUSE_UNROLL
      for (int k = 0; k < kDepth; ++k) ptr[k] = static_cast<scalar_t*>(meta.addresses[k][e.tensor]) + e.offset;
      const opmath_t scale = common.grad_scale ? static_cast<opmath_t>(*common.grad_scale) : opmath_t(1);
      const opmath_t sign = gradient_sign<Rule, opmath_t>(common.hyper + meta.group[e.tensor] * Rule::kColumns);
      const unsigned flags = kPresent | c.switches;
      const bool measured = common.block_stats != nullptr;  // the same for every thread: no divergence
      ThreadStats<opmath_t> sums;
      // chunk_loop stores every operand but the gradient back; dividing by a scale of 1 is exact.
      chunk_loop<scalar_t, opmath_t, kDepth>(ptr, e.n, thread, threads, [&](opmath_t(&x)[kDepth]) {
        const opmath_t before = x[0], grad = x[1] / scale;
        opmath_t s[kStates] = {};
        LRFUSE_UNROLL
        for (int k = 0; k < kStates; ++k)
          if (state_present<Rule>(kPresent, k)) s[k] = x[slot(k)];
        Rule::update(x[0], grad * sign, s, c, flags);
        LRFUSE_UNROLL
        for (int k = 0; k < kStates; ++k)
          if (state_present<Rule>(kPresent, k)) x[slot(k)] = s[k];
        if (measured) sums.add(before, static_cast<opmath_t>(static_cast<scalar_t>(x[0])), grad);  // as stored
      });
      return sums;
    }

    // Where block `block` of a measured launch writes its sums.
    static LRFUSE_HD double* stats_row(const Meta& meta, const Common& common, int block) {
      double* row = common.block_stats + static_cast<int64_t>(block) * BlockStats::kWidth;
      row[BlockStats::kGroup] = meta.group[meta.block_tensor[block]];
      return row;
    }
  };
};

}  // namespace lrfuse::cuda
