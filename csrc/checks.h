// Argument checks shared by every backend. They run before a kernel writes anything, so a bad
// call leaves parameters and state untouched, and each message names the argument and the fix.
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

namespace lrfuse {

using NamedList = std::pair<const char*, at::TensorList>;

struct FusedArgs {
  const char* op;
  at::TensorList params;
  at::TensorList grads;
  std::vector<NamedList> states;           // one tensor per parameter
  std::vector<NamedList> optional_states;  // empty, or one tensor per parameter
  at::TensorList steps;
  bool has_steps;  // false: the rule keeps no step and `steps` is empty
  at::IntArrayRef group_of;
  const at::Tensor& hyper;
  int64_t hyper_columns;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  const std::optional<at::Tensor>& stats;  // float64, (hyper rows, stats_columns), written
  int64_t stats_columns;
};

// Every check of a call, in this order (a backend may run check_tensor in parallel, for a call's
// tensors in any order, provided that it reports the error of the first failing tensor):
void check_call_args(const FusedArgs& a);         // list lengths, the hyper table, grad_scale, found_inf, stats
void check_tensor(const FusedArgs& a, size_t i);  // tensor i: parameter, gradient, state, step, group row
void check_distinct(const FusedArgs& a);          // no parameter passed twice
void check_fused_args(const FusedArgs& a);        // all three

}  // namespace lrfuse
