// What one block of each fused CUDA kernel does, as host-and-device code. Each kernel is a
// struct of three parts: `Meta`, the launch's parameter struct; `consts`, run once per block
// (by thread 0 on the device), which computes the tensor's per-step constants from its group's
// hyper-table row and advances the step when the block owns it; and `update`, run by every
// thread on its share of the block's chunk with the per-element math of update_rules.h.
//
// fused_optim.cu wraps them in one CUDA kernel template. The CPU tests run the same parts on the
// host, block after block and thread after thread (tests/cuda_emulator.cpp), against torch.optim.
#pragma once

#include <ATen/OpMathType.h>

#include "../update_rules.h"
#include "launch_plan.h"

namespace lrfuse::cuda {

// found_inf set (GradScaler saw an inf or NaN): nothing is written, no step advances.
LRFUSE_HD bool skip_step(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

// Thread `thread`'s share of block `block`: `op(x, scale)` on each of its elements, `x` the
// operands in the math type (chunk_loop stores all but the gradient back), `scale` GradScaler's.
template <typename scalar_t, typename opmath_t, int kDepth, typename Op>
LRFUSE_HD void block_loop(const TensorListMeta<kDepth>& meta, const Common& common, int block, int thread,
                          int threads, const Op& op) {
  const Extent e = block_extent(meta, block);
  scalar_t* ptr[kDepth];
  LRFUSE_UNROLL
  for (int k = 0; k < kDepth; ++k) ptr[k] = static_cast<scalar_t*>(meta.addresses[k][e.tensor]) + e.offset;
  const opmath_t scale = common.grad_scale ? static_cast<opmath_t>(*common.grad_scale) : opmath_t(1);
  chunk_loop<scalar_t, opmath_t, kDepth>(ptr, e.n, thread, threads, [&](opmath_t(&x)[kDepth]) { op(x, scale); });
}

// Operands: param, grad, exp_avg, exp_avg_sq, then max_exp_avg_sq with amsgrad.
template <bool kAmsgrad>
struct AdamKernel {
  static constexpr int kDepth = 4 + kAmsgrad;
  using Meta = TensorListMeta<kDepth>;

  template <typename scalar_t>
  struct Block {
    using opmath_t = at::opmath_type<scalar_t>;
    using Meta = AdamKernel::Meta;
    using Consts = AdamConsts<opmath_t>;

    static LRFUSE_HD Consts consts(const Meta& meta, const Common& common, int block) {
      const int t = meta.block_tensor[block];
      const float step = *meta.step[t] + 1.0f;  // as torch: the step counts this update
      if (block_owns_step(meta.numel[t])) *meta.step[t] = step;
      return adam_consts<opmath_t>(common.hyper + meta.group[t] * adam_col::count, step, kAmsgrad);
    }

    static LRFUSE_HD void update(const Meta& meta, const Common& common, int block, int thread, int threads,
                                 const Consts c) {
      block_loop<scalar_t, opmath_t, kDepth>(meta, common, block, thread, threads,
                                             [&](opmath_t(&x)[kDepth], opmath_t scale) {
        const opmath_t g = x[1] / scale;  // dividing by 1 is exact: no branch needed
        if constexpr (kAmsgrad) {
          adam_update(x[0], g, x[2], x[3], x[4], c);
        } else {
          opmath_t unused = 0;
          adam_update(x[0], g, x[2], x[3], unused, c);
        }
      });
    }
  };
};

// Operands: param, grad, square_avg, then momentum_buffer and grad_avg when present.
template <bool kMomentum, bool kCentered>
struct RMSpropKernel {
  static constexpr int kDepth = 3 + kMomentum + kCentered;
  static constexpr int kBuf = kMomentum ? 3 : 0, kGradAvg = kCentered ? 3 + kMomentum : 0;
  using Meta = TensorListMeta<kDepth>;

  template <typename scalar_t>
  struct Block {
    using opmath_t = at::opmath_type<scalar_t>;
    using Meta = RMSpropKernel::Meta;
    using Consts = RMSpropConsts<opmath_t>;

    static LRFUSE_HD Consts consts(const Meta& meta, const Common& common, int block) {
      const int t = meta.block_tensor[block];
      if (block_owns_step(meta.numel[t])) *meta.step[t] += 1.0f;
      return rmsprop_consts<opmath_t>(common.hyper + meta.group[t] * rmsprop_col::count, kCentered, kMomentum);
    }

    static LRFUSE_HD void update(const Meta& meta, const Common& common, int block, int thread, int threads,
                                 const Consts c) {
      block_loop<scalar_t, opmath_t, kDepth>(meta, common, block, thread, threads,
                                             [&](opmath_t(&x)[kDepth], opmath_t scale) {
        opmath_t no_buf = 0, no_grad_avg = 0;
        rmsprop_update(x[0], x[1] / scale, x[2], kMomentum ? x[kBuf] : no_buf, kCentered ? x[kGradAvg] : no_grad_avg,
                       c);
      });
    }
  };
};

}  // namespace lrfuse::cuda
