// CPU kernels of the fused ops, every rule through the same code: one parallel region per call
// over every tensor of every group (plan.h), the rule's element math (rules/) in the loop.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <atomic>
#include <utility>

#include "../cpu_isa.h"
#include "../fused_op.h"
#include "plan.h"

namespace lrfuse::cpu {
namespace {

using at::Tensor;
using at::TensorList;

template <typename Rule, typename scalar_t>
using ConstsOf = typename Rule::template Consts<at::opmath_type<scalar_t>>;

// update_element and flat take the states as separate __restrict__ pointers, which GCC needs to
// vectorize without run-time alias checks; a rule with a fourth state adds one here.
static_assert(kMaxStates == 3, "update_element / flat take three state pointers: add one per state");

// One element: the rule's update of p (given as `pi`) with the gradient `gi` (unscaled, and
// negated when maximizing), its states loaded from and stored to the state pointers present
// under kFlags; returns the new parameter as stored.
template <typename Rule, unsigned kFlags, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
__attribute__((always_inline)) inline scalar_t update_element(int64_t i, opmath_t pi, opmath_t gi, scalar_t* __restrict__ s0,
                                                              scalar_t* __restrict__ s1, scalar_t* __restrict__ s2,
                                                              const ConstsOf<Rule, scalar_t>& c) {
  constexpr int kStates = num_states<Rule>();
  constexpr bool k0 = kStates > 0 && state_present<Rule>(kFlags, 0);
  constexpr bool k1 = kStates > 1 && state_present<Rule>(kFlags, 1);
  constexpr bool k2 = kStates > 2 && state_present<Rule>(kFlags, 2);
  opmath_t s[kStates > 0 ? kStates : 1] = {};
  if constexpr (k0) s[0] = s0[i];
  if constexpr (k1) s[1] = s1[i];
  if constexpr (k2) s[2] = s2[i];
  Rule::update(pi, gi, s, c, Flags<kFlags>{});
  if constexpr (k0) s0[i] = s[0];
  if constexpr (k1) s1[i] = s[1];
  if constexpr (k2) s2[i] = s[2];
  return static_cast<scalar_t>(pi);
}

// The element loops. The contiguous loop is specialised per combination of the rule's flags
// (which optional states are present, and its switches such as weight decay), so the loop body
// has no branch and no conditional load and GCC vectorizes it; the clones give AVX-512, AVX2 and
// baseline versions, picked for the running processor. `maximize` is a multiply by -1 (exact).
// The loop has two copies, with and without the grad_scale division: in cache (`tiny`) a step is
// bound by divide/sqrt throughput, and dividing by a missing scale of 1 would add a divide per
// element. The strided loop (transposed or sliced tensors, rare) reads the flags at run time.
//
// A measured step (`sums`: fused_op.h's kStat columns) runs the same update with the sums in the
// loop, in blocks of kStatsBlock elements: `omp simd` lets the lanes sum a block's few terms in the
// math type (float32 rounding of a sum of 32 squares, not of thousands), and blocks add up in
// double. The squares are fused multiply-adds, and the non-finite count is taken only for a block
// whose squared-gradient sum is not finite (a NaN or inf gradient makes it so): three instructions
// an element. A pass that keeps the parameters and two more loops around the plain one cost 1.5x
// it in cache, this 1.35x (design note).
constexpr int64_t kStatsBlock = 256;

template <typename scalar_t, bool kScaled>
int64_t count_nonfinite(int64_t n, const scalar_t* g, at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t gi = kScaled ? g[i] / scale : opmath_t(g[i]);
    count += !std::isfinite(gi);
  }
  return count;
}

template <typename Rule, unsigned kFlags, bool kScaled, bool kMeasured, typename scalar_t>
LRFUSE_CPU_CLONES void flat(int64_t n, scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                            scalar_t* __restrict__ s0, scalar_t* __restrict__ s1, scalar_t* __restrict__ s2,
                            ConstsOf<Rule, scalar_t> c, at::opmath_type<scalar_t> scale, at::opmath_type<scalar_t> sign,
                            double* sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  if constexpr (!kMeasured) {
    for (int64_t i = 0; i < n; ++i) {
      opmath_t gi = g[i];
      if constexpr (kScaled) gi = gi / scale;
      p[i] = update_element<Rule, kFlags>(i, opmath_t(p[i]), gi * sign, s0, s1, s2, c);
    }
  } else {
    for (int64_t start = 0; start < n; start += kStatsBlock) {
      const int64_t end = std::min(n, start + kStatsBlock);
      opmath_t update_sq = 0, param_sq = 0, grad_sq = 0;
#pragma omp simd reduction(+ : update_sq, param_sq, grad_sq)
      for (int64_t i = start; i < end; ++i) {
        const opmath_t before = p[i];
        opmath_t gi = g[i];
        if constexpr (kScaled) gi = gi / scale;
        const scalar_t after = update_element<Rule, kFlags>(i, before, gi * sign, s0, s1, s2, c);
        p[i] = after;
        const opmath_t d = static_cast<opmath_t>(after) - before;  // exact when below the weight
        update_sq = std::fma(d, d, update_sq);
        param_sq = std::fma(before, before, param_sq);
        grad_sq = std::fma(gi, gi, grad_sq);
      }
      sums[kUpdateSq] += update_sq;
      sums[kParamSq] += param_sq;
      sums[kGradSq] += grad_sq;
      if (!std::isfinite(grad_sq)) sums[kNonfinite] += count_nonfinite<scalar_t, kScaled>(end - start, g + start, scale);
    }
  }
}

template <typename Rule, typename scalar_t>
using FlatLoop = void (*)(int64_t, scalar_t*, const scalar_t*, scalar_t*, scalar_t*, scalar_t*,
                          ConstsOf<Rule, scalar_t>, at::opmath_type<scalar_t>, at::opmath_type<scalar_t>, double*);

// Every specialisation of `flat`: entry 4 * flags + 2 * measured + scaled.
template <typename Rule, typename scalar_t, size_t... I>
constexpr std::array<FlatLoop<Rule, scalar_t>, sizeof...(I)> flat_loops(std::index_sequence<I...>) {
  return {&flat<Rule, static_cast<unsigned>(I / 4), I % 2 == 1, I / 2 % 2 == 1, scalar_t>...};
}

template <typename Rule, typename scalar_t>
FlatLoop<Rule, scalar_t> pick_flat(unsigned flags, bool scaled, bool measured) {
  static const auto loops = flat_loops<Rule, scalar_t>(std::make_index_sequence<4u << Rule::kNumFlags>());
  return loops[4 * flags + 2 * measured + scaled];
}

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
            pick_flat<Rule, scalar_t>(flags, scaled, sums != nullptr)(n, ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], c,
                                                                    scale_value, sign, sums);
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
