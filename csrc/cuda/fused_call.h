// One fused call of the CUDA backend, from tensor lists to launches, written against a
// `Launcher` so that it needs ATen but no CUDA: fused_optim.cu passes the one that launches
// kernels on the current stream; the CPU tests pass one that runs the same blocks on the host
// (tests/cuda_emulator.cpp). A Launcher has
//   template <typename Block> static void launch(const typename Block::Meta&, int blocks, const Common&);
//   static void increment_steps(const std::vector<float*>& steps, const float* found_inf);
//   static void sum_stats(const double* rows, int64_t nrows, double* stats, int groups, const float* found_inf);
// (the last adds each group's BlockStats rows into its row of `stats`; see kernels.h).
//
// Steps: a tensor that fits in one chunk is owned by one block, which reads the step and writes
// step + 1 itself. A tensor of several chunks is read by several blocks, maybe across launches,
// in no order; they all compute with step + 1 and `increment_steps`, after the last update,
// writes the new steps (as for a zero-size tensor, whose step still advances as torch's does).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <optional>
#include <utility>
#include <vector>

#include "../fused_op.h"
#include "kernels.h"
#include "launch_plan.h"

namespace lrfuse::cuda {

// The tensors of one call and how they are launched. Operands whose layout the flat loop cannot
// walk (not dense, or strides unlike the parameter's: a transposed weight with a contiguous
// gradient, a sliced parameter) run on contiguous temporaries that `copy_back` copies back after
// the launches. That costs an allocation and two copies for those tensors only; it is rare, and
// the CPU kernel walks strides instead. Every other tensor is updated in place in the fused launch.
template <int kDepth>
class MultiTensorCall {
 public:
  // lists[0] params, lists[1] grads, then the state lists present (each one per parameter).
  MultiTensorCall(const std::array<at::TensorList, kDepth>& lists, at::TensorList steps, at::IntArrayRef group_of) {
    const size_t n = lists[0].size();
    entries_.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      Entry e;
      e.slot.step = nullptr;  // a rule that keeps no step
      const at::Tensor& p = lists[0][i];
      bool flat = p.is_non_overlapping_and_dense();
      for (int k = 1; k < kDepth && flat; ++k) flat = same_layout(p, lists[k][i]);
      for (int k = 0; k < kDepth; ++k) {
        e.operands[k] = flat ? lists[k][i] : lists[k][i].contiguous();
        if (!flat && k != 1 && !e.operands[k].is_same(lists[k][i])) copy_back_.push_back({lists[k][i], e.operands[k]});
      }
      for (int k = 0; k < kDepth; ++k) e.slot.addresses[k] = e.operands[k].data_ptr();
      e.slot.numel = p.numel();
      // The kernels count in float32 (exact to 2^24 steps); a float64 step (torch's under a
      // float64 default dtype) runs on a float32 copy, which copy_back keeps and writes back.
      if (!steps.empty()) {
        at::Tensor step = steps[i];
        if (step.scalar_type() != at::kFloat) {
          step = steps[i].to(at::kFloat);
          copy_back_.push_back({steps[i], step});
        }
        e.slot.step = step.data_ptr<float>();
      }
      e.slot.group = static_cast<int32_t>(group_of[i]);
      entries_.push_back(std::move(e));
    }
  }

  // How many blocks the launches have in all (one per chunk of each tensor).
  int64_t blocks() const {
    int64_t n = 0;
    for (const Entry& e : entries_) n += (e.slot.numel + kChunkSize - 1) / kChunkSize;
    return n;
  }

  // The dtypes of the parameters, in order of first appearance: one `run` each.
  std::vector<at::ScalarType> dtypes() const {
    std::vector<at::ScalarType> out;
    for (const Entry& e : entries_) {
      const at::ScalarType t = e.operands[0].scalar_type();
      if (std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
    }
    return out;
  }

  // Launches the kernels for the tensors of `dtype`; `launch(meta, blocks)` launches one.
  template <typename Launch>
  void run(at::ScalarType dtype, const Launch& launch) {
    LaunchPacker<kDepth> packer;
    for (const Entry& e : entries_) {
      if (e.operands[0].scalar_type() != dtype) continue;
      packer.add(e.slot, launch);
      if (e.slot.step != nullptr && !block_owns_step(e.slot.numel)) late_steps_.push_back(e.slot.step);
    }
    packer.flush(launch);
  }

  // After every `run`: the steps that no block advanced (several chunks, or none).
  const std::vector<float*>& late_steps() const { return late_steps_; }

  // After the launches: the temporaries' values into the tensors they stand for.
  void copy_back() {
    for (auto& [original, temporary] : copy_back_) original.copy_(temporary);
  }

 private:
  struct Entry {
    std::array<at::Tensor, kDepth> operands;  // keeps contiguous temporaries alive
    TensorSlot<kDepth> slot;
  };

  std::vector<Entry> entries_;
  std::vector<float*> late_steps_;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back_;
};

inline Common common_of(const FusedCall& call) {
  return {call.hyper.data_ptr<double>(), call.grad_scale ? call.grad_scale->data_ptr<float>() : nullptr,
          call.found_inf ? call.found_inf->data_ptr<float>() : nullptr, nullptr};
}

// Every tensor of the lists through `Kernel`: one launch per dtype present (more past a launch's
// capacity), then the late steps, then each group's stats when measured, then the temporaries.
template <typename Launcher, typename Kernel>
void fused_launches(const std::array<at::TensorList, Kernel::kDepth>& lists, const FusedCall& fused_call) {
  MultiTensorCall<Kernel::kDepth> call(lists, fused_call.steps, fused_call.group_of);
  Common common = common_of(fused_call);
  at::Tensor rows;  // a measured call's BlockStats, each block's row in launch order
  if (fused_call.stats) {
    rows = at::empty({call.blocks(), BlockStats::kWidth}, fused_call.stats->options());
    common.block_stats = rows.data_ptr<double>();
  }
  for (const at::ScalarType dtype : call.dtypes()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lrfuse_fused_launches", [&] {
      using Block = typename Kernel::template Block<scalar_t>;
      call.run(dtype, [&](const typename Kernel::Meta& meta, int blocks) {
        Launcher::template launch<Block>(meta, blocks, common);
        if (common.block_stats) common.block_stats += static_cast<int64_t>(blocks) * BlockStats::kWidth;
      });
    });
  }
  Launcher::increment_steps(call.late_steps(), common.found_inf);
  if (fused_call.stats && rows.size(0) > 0)
    Launcher::sum_stats(rows.data_ptr<double>(), rows.size(0), fused_call.stats->data_ptr<double>(),
                        static_cast<int>(fused_call.stats->size(0)), common.found_inf);
  call.copy_back();
}

// Launches every tensor of the call through `RuleKernel<Rule, kPresent>` (the lists present).
template <typename Launcher, typename Rule, unsigned kPresent>
void fused_present(const FusedCall& call) {
  using Kernel = RuleKernel<Rule, kPresent>;
  std::array<at::TensorList, Kernel::kDepth> lists;
  lists[0] = call.params;
  lists[1] = call.grads;
  for (int k = 0; k < Kernel::kStates; ++k)
    if (state_present<Rule>(kPresent, k)) lists[Kernel::slot(k)] = call.states[k];
  fused_launches<Launcher, Kernel>(lists, call);
}

template <typename Launcher, typename Rule, size_t... kPresent>
void fused_dispatch(unsigned present, const FusedCall& call, std::index_sequence<kPresent...>) {
  // One kernel per combination of optional states: the matching one runs.
  ((present == kPresent ? fused_present<Launcher, Rule, kPresent>(call) : void()), ...);
}

// An op's body after the argument checks (checks.h).
template <typename Launcher, typename Rule>
void fused(const FusedCall& call) {
  fused_dispatch<Launcher, Rule>(present_optional<Rule>(call), call,
                                 std::make_index_sequence<1u << Rule::kOptionalStates.size()>());
}

}  // namespace lrfuse::cuda
