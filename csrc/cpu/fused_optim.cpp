// CPU kernels of the fused ops, every rule through the same code: the checks, then one parallel
// region per call over every tensor of every group (plan.h), each run of elements in a loop of
// loops.h (compiled in plain_loops.cpp and measured_loops.cpp) or, when strided, the loop below.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <atomic>
#include <utility>

#include "../fused_op.h"
#include "loops.h"
#include "plan.h"

namespace lrfuse::cpu {

// The contiguous loops are compiled in plain_loops.cpp and measured_loops.cpp, not here.
#define LRFUSE_EXTERN_LOOPS(Rule) LRFUSE_CPU_LOOPS(extern, Rule, false) LRFUSE_CPU_LOOPS(extern, Rule, true)
LRFUSE_RULES(LRFUSE_EXTERN_LOOPS)
#undef LRFUSE_EXTERN_LOOPS

namespace {

using at::Tensor;
using at::TensorList;

// `sums`: null, or the kStat columns to add this run's sums to.
template <typename Rule, typename scalar_t>
void strided(int64_t n, const std::array<scalar_t*, kMaxOperands>& ptr, const int64_t* stride,
             const ConstsOf<Rule, scalar_t>& c, at::opmath_type<scalar_t> scale, at::opmath_type<scalar_t> sign,
             unsigned flags, double* sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kStates = num_states<Rule>();
  double update_sq = 0, param_sq = 0, grad_sq = 0, nonfinite = 0;
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t before = ptr[0][i * stride[0]], gi = ptr[1][i * stride[1]] / scale;
    opmath_t pi = before;
    opmath_t s[kStates > 0 ? kStates : 1] = {};
    for (int k = 0; k < kStates; ++k)
      if (ptr[2 + k]) s[k] = ptr[2 + k][i * stride[2 + k]];
    Rule::update(pi, gi * sign, s, c, flags);
    const scalar_t after = static_cast<scalar_t>(pi);
    ptr[0][i * stride[0]] = after;
    for (int k = 0; k < kStates; ++k)
      if (ptr[2 + k]) ptr[2 + k][i * stride[2 + k]] = s[k];
    if (sums) {
      const double d = double(after) - double(before);
      update_sq += d * d;
      param_sq += double(before) * double(before);
      grad_sq += double(gi) * double(gi);
      nonfinite += gi - gi != opmath_t(0) ? 1.0 : 0.0;
    }
  }
  if (sums) {
    sums[kUpdateSq] += update_sq;
    sums[kParamSq] += param_sq;
    sums[kGradSq] += grad_sq;
    sums[kNonfinite] += nonfinite;
  }
}

// Checks done; an inf/NaN found by GradScaler skips the whole step, `step` included.
bool skip_step(const std::optional<Tensor>& found_inf) {
  return found_inf && *found_inf->data_ptr<float>() != 0.0f;
}

// Steps advance once per tensor, before the parallel region reads them (float32, or float64
// as torch keeps them under a float64 default dtype).
std::vector<double> advance_steps(TensorList steps) {
  std::vector<double> values(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    if (steps[i].scalar_type() == at::kDouble) {
      values[i] = *steps[i].data_ptr<double>() += 1.0;
    } else {
      values[i] = *steps[i].data_ptr<float>() += 1.0f;
    }
  }
  return values;
}

// Elements per tile of a measured step (plan.h's run_tiles).
constexpr int64_t kStatsTile = 16384;

constexpr int64_t kTensorGrain = 64;  // tensors per chunk of the checking and planning pass

// Every check of checks.h, with each tensor's walk (plan.h) planned in the same parallel pass:
// each tensor's metadata is read once, where the previous step has usually pushed it out of the
// caches. The error raised is the first failing tensor's in order, as the serial checks would raise.
template <typename OperandsOf>
Plan checked_plan(const FusedArgs& args, size_t n, const OperandsOf& operands_of) {
  check_call_args(args);
  Plan plan(n);
  std::vector<char> later(n, 0);  // copy-on-write storage: planned serially below
  std::atomic<size_t> first_failure{n};
  at::parallel_for(0, static_cast<int64_t>(n), kTensorGrain, [&](int64_t begin, int64_t end) {
    for (size_t i = begin; i < static_cast<size_t>(end) && i < first_failure.load(); ++i) {
      try {
        check_tensor(args, i);
        const auto operands = operands_of(i);
        if (Plan::copy_on_write(operands)) later[i] = 1;
        else plan.set(i, operands);
      } catch (...) {
        size_t seen = first_failure.load();
        while (i < seen && !first_failure.compare_exchange_weak(seen, i)) {
        }
        return;
      }
    }
  });
  if (const size_t failed = first_failure.load(); failed < n) {
    check_tensor(args, failed);  // raises again, from this thread
    plan.set(failed, operands_of(failed));
    TORCH_INTERNAL_ASSERT(false, args.op, ": tensor ", failed, " failed in the parallel pass only");
  }
  for (size_t i = 0; i < n; ++i)
    if (later[i]) plan.set(i, operands_of(i));
  check_distinct(args);
  plan.finish();
  return plan;
}

struct Cpu {
  template <typename Rule>
  static void run(const FusedCall& call) {
    constexpr int kStates = num_states<Rule>();
    const unsigned present = present_optional<Rule>(call);
    const size_t n = call.params.size();
    auto operands_of = [&](size_t i) {
      std::array<const Tensor*, kMaxOperands> operands{&call.params[i], &call.grads[i]};
      for (int k = 0; k < kStates; ++k)
        if (!call.states[k].empty()) operands[2 + k] = &call.states[k][i];
      return operands;
    };
    const Plan plan = checked_plan(fused_args<Rule>(call), n, operands_of);
    if (skip_step(call.found_inf)) return;  // after the checks: a skipped step still refuses bad arguments
    const std::vector<double> step = advance_steps(call.steps);
    const double* table = call.hyper.data_ptr<double>();
    const float* scale = call.grad_scale ? call.grad_scale->data_ptr<float>() : nullptr;
    // Elements [lo, hi) of tensor i; `sums` null, or where to add their kStat sums.
    auto visit = [&](size_t i, int64_t lo, int64_t hi, double* sums) {
      const double* row = table + call.group_of[i] * Rule::kColumns;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.params[i].scalar_type(), "lrfuse_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const auto c = Rule::template consts<opmath_t>(row, step.empty() ? 0.0 : step[i]);
        const unsigned flags = present | c.switches;
        const opmath_t scale_value = scale ? opmath_t(*scale) : opmath_t(1);
        const opmath_t sign = gradient_sign<Rule, opmath_t>(row);
        Plan::for_each_run<scalar_t>(plan.walk(i), lo, hi, [&](auto contiguous, int64_t n, auto ptrs, const int64_t* s) {
          if constexpr (decltype(contiguous)::value) {
            const bool scaled = scale_value != opmath_t(1);  // no grad_scale, or one of 1: g / 1 == g
            const auto loop = sums ? flat_loop<Rule, scalar_t, true>(flags, scaled)
                                   : flat_loop<Rule, scalar_t, false>(flags, scaled);
            loop(n, ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], c, scale_value, sign, sums);
          } else {
            strided<Rule, scalar_t>(n, ptrs, s, c, scale_value, sign, flags, sums);
          }
        });
      });
    };
    if (!call.stats) {
      plan.run([&](size_t i, int64_t lo, int64_t hi) { visit(i, lo, hi, nullptr); });
      return;
    }
    // Measured: per-tile sums, then added to each tensor's row tile after tile, tensor after
    // tensor, so the same step gives the same bits whatever the thread count.
    const std::vector<int64_t> first = plan.tiles(kStatsTile);
    std::vector<std::array<double, kStatColumns>> partial(first.back(), std::array<double, kStatColumns>{});
    plan.run_tiles(first, kStatsTile, [&](size_t i, int64_t lo, int64_t hi, int64_t t) {
      visit(i, lo, hi, partial[t].data());
    });
    double* stats = call.stats->data_ptr<double>();
    for (size_t i = 0; i < n; ++i) {
      double* out = stats + call.group_of[i] * kStatColumns;
      for (int64_t t = first[i]; t < first[i + 1]; ++t)
        for (int k = 0; k < kStatColumns; ++k) out[k] += partial[t][k];
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(lrfuse, CPU, m) { register_rules<Cpu>(m); }

}  // namespace lrfuse::cpu
