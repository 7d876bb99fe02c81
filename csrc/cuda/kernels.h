// What one block of the fused CUDA kernel does, as host-and-device code, for any rule
// (rules/rule.h). `RuleKernel<Rule, kPresent>` (kPresent: which optional states the call carries)
// has three parts: `Meta`, the launch's parameter struct; `consts`, run once per block (by thread
// 0 on the device), which computes the tensor's per-step constants from its group's hyper-table
// row and advances the step when the block owns it; and `update`, run by every thread on its
// share of the block's chunk with the rule's per-element math.
//
// fused_optim.cu wraps them in one CUDA kernel template. The CPU tests run the same parts on the
// host, block after block and thread after thread (tests/cuda_emulator.cpp), against torch.optim.
#pragma once

#include <ATen/OpMathType.h>

#include "../rules/all.h"
#include "launch_plan.h"

namespace lrfuse::cuda {

// found_inf set (GradScaler saw an inf or NaN): nothing is written, no step advances.
LRFUSE_HD bool skip_step(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

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

    static LRFUSE_HD void update(const Meta& meta, const Common& common, int block, int thread, int threads,
                                 const Consts c) {
      const Extent e = block_extent(meta, block);
      scalar_t* ptr[kDepth];
      LRFUSE_UNROLL
      for (int k = 0; k < kDepth; ++k) ptr[k] = static_cast<scalar_t*>(meta.addresses[k][e.tensor]) + e.offset;
      const opmath_t scale = common.grad_scale ? static_cast<opmath_t>(*common.grad_scale) : opmath_t(1);
      const opmath_t sign = c.maximize ? opmath_t(-1) : opmath_t(1);
      const unsigned flags = kPresent | c.switches;
      // chunk_loop stores every operand but the gradient back; dividing by a scale of 1 is exact.
      chunk_loop<scalar_t, opmath_t, kDepth>(ptr, e.n, thread, threads, [&](opmath_t(&x)[kDepth]) {
        opmath_t s[kStates] = {};
        LRFUSE_UNROLL
        for (int k = 0; k < kStates; ++k)
          if (state_present<Rule>(kPresent, k)) s[k] = x[slot(k)];
        Rule::update(x[0], x[1] / scale * sign, s, c, flags);
        LRFUSE_UNROLL
        for (int k = 0; k < kStates; ++k)
          if (state_present<Rule>(kPresent, k)) x[slot(k)] = s[k];
      });
    }
  };
};

}  // namespace lrfuse::cuda
