// The fused op of a rule (rules/rule.h), as every backend sees it: its schema, its arguments
// gathered in one struct, and the typed kernel signature the dispatcher calls, generated from
// the rule's lists so that no backend writes an algorithm's argument list out.
//
//   fused_<name>_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] <state>, ...,
//                 Tensor(x!)[] steps, int[] group_of, Tensor hyper,
//                 Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(y!)? stats=None) -> ()
//
// (`steps` only for rules that count steps.) `group_of[i]` is the row of `hyper` (float64, one
// row per group, the rule's columns) that tensor i reads, so groups with different learning rates
// share the call. Optional state lists are empty (the feature is off) or hold one tensor per
// parameter. `stats`, when given, is a float64 table with a row per row of `hyper` to which the
// step adds, for the tensors of each row, the kStat columns below; a step that found_inf skips
// adds nothing.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <utility>

#include "checks.h"
#include "rules/all.h"

namespace lrfuse {

// The most state lists any rule has (LRFUSE_RULES): a rule's own header sets its count.
#define LRFUSE_NUM_STATES(Rule) num_states<Rule>(),
constexpr int kMaxStates = std::max({LRFUSE_RULES(LRFUSE_NUM_STATES) 0});
#undef LRFUSE_NUM_STATES

// The columns of `stats`: sums over the row's tensors of the squared update as applied (the
// parameter after the step minus before it, both as stored), the squared parameter before the
// step, the squared gradient as the step used it (unscaled; before weight decay and maximize),
// and the count of non-finite gradient elements.
enum Stat : int { kUpdateSq, kParamSq, kGradSq, kNonfinite, kStatColumns };

// One call's arguments. `states` in the rule's order: kStates, then kOptionalStates.
struct FusedCall {
  at::TensorList params, grads;
  std::array<at::TensorList, kMaxStates> states;
  at::TensorList steps;  // empty for a rule that keeps no step
  at::IntArrayRef group_of;
  const at::Tensor& hyper;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  const std::optional<at::Tensor>& stats;
};

// Whether `b`'s elements lie in `a`'s order (the same stride wherever `a`'s size is above 1):
// both backends update a dense tensor and operands laid out like it in one flat pass.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

template <typename Rule>
std::string op_name() {
  return std::string("fused_") + Rule::kName + "_";
}

template <typename Rule>
std::string schema() {
  std::string s = op_name<Rule>() + "(Tensor(a!)[] params, Tensor[] grads, ";
  char alias = 'b';
  for (const char* name : Rule::kStates) s += std::string("Tensor(") + alias++ + "!)[] " + name + ", ";
  for (const char* name : Rule::kOptionalStates) s += std::string("Tensor(") + alias++ + "!)[] " + name + ", ";
  if (Rule::kCountsSteps) s += std::string("Tensor(") + alias++ + "!)[] steps, ";
  return s + "int[] group_of, Tensor hyper, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(" + alias +
         "!)? stats=None) -> ()";
}

// The arguments as checks.h sees them, named after the rule's lists.
template <typename Rule>
FusedArgs fused_args(const FusedCall& call) {
  static const std::string name = op_name<Rule>();
  FusedArgs args{name.c_str(), call.params, call.grads, {}, {}, call.steps, Rule::kCountsSteps, call.group_of,
                 call.hyper, Rule::kColumns, call.grad_scale, call.found_inf, call.stats, kStatColumns};
  int k = 0;
  for (const char* state : Rule::kStates) args.states.push_back({state, call.states[k++]});
  for (const char* state : Rule::kOptionalStates) args.optional_states.push_back({state, call.states[k++]});
  return args;
}

// Every check of checks.h, in order (a backend with no pass over the tensors of its own).
template <typename Rule>
void check_call(const FusedCall& call) {
  check_fused_args(fused_args<Rule>(call));
}

// Which optional states a call carries: bit k set when optional list k is not empty.
template <typename Rule>
unsigned present_optional(const FusedCall& call) {
  unsigned mask = 0, bit = 1;
  size_t k = Rule::kStates.size();
  for ([[maybe_unused]] const char* name : Rule::kOptionalStates) {
    if (!call.states[k++].empty()) mask |= bit;
    bit <<= 1;
  }
  return mask;
}

// Whether state k of a rule is present under flag bits `flags` (required states always are).
template <typename Rule>
constexpr bool state_present(unsigned flags, int k) {
  const int required = static_cast<int>(Rule::kStates.size());
  return k < required || (flags >> (k - required)) & 1u;
}

// The typed kernel the dispatcher calls: `Backend::template run<Rule>(FusedCall)` behind the
// rule's signature (one TensorList per state, `steps` when the rule counts them).
template <typename Rule, typename Backend, typename = std::make_index_sequence<num_states<Rule>()>>
struct Kernel;

template <typename Rule, typename Backend, size_t... I>
struct Kernel<Rule, Backend, std::index_sequence<I...>> {
  template <size_t>
  using List = at::TensorList;

  static void with_steps(at::TensorList params, at::TensorList grads, List<I>... states, at::TensorList steps,
                         at::IntArrayRef group_of, const at::Tensor& hyper,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& stats) {
    Backend::template run<Rule>(
        FusedCall{params, grads, {states...}, steps, group_of, hyper, grad_scale, found_inf, stats});
  }

  static void without_steps(at::TensorList params, at::TensorList grads, List<I>... states, at::IntArrayRef group_of,
                            const at::Tensor& hyper, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& stats) {
    Backend::template run<Rule>(
        FusedCall{params, grads, {states...}, {}, group_of, hyper, grad_scale, found_inf, stats});
  }

  static auto function() {
    if constexpr (Rule::kCountsSteps) return &with_steps;
    else return &without_steps;
  }
};

// m.impl of every rule's op for one backend.
template <typename Backend, typename Library>
void register_rules(Library& m) {
#define LRFUSE_IMPL(Rule) m.impl(op_name<Rule>().c_str(), Kernel<Rule, Backend>::function());
  LRFUSE_RULES(LRFUSE_IMPL)
#undef LRFUSE_IMPL
}

}  // namespace lrfuse
