// The contiguous element loops of the CPU kernels (fused_optim.cpp walks the tensors and picks
// one per run of elements). Every (rule, dtype, flags, scaled) combination is its own function,
// in three instruction-set clones: most of the CPU build. They are compiled in two translation
// units that build side by side, plain_loops.cpp and measured_loops.cpp; fused_optim.cpp
// declares them `extern`.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <array>
#include <cmath>
#include <utility>

#include "../cpu_isa.h"
#include "../fused_op.h"

namespace lrfuse::cpu {

template <typename Rule, typename scalar_t>
using ConstsOf = typename Rule::template Consts<at::opmath_type<scalar_t>>;

// update_element and flat take the states as separate __restrict__ pointers, which GCC needs to
// vectorize without run-time alias checks; a rule with a fourth state adds one here.
static_assert(kMaxStates == 3, "update_element / flat take three state pointers: add one per state");

// Whether state k is one of the rule's and present under kFlags (a flag bit past the optional
// states is a switch, not a state).
template <typename Rule, unsigned kFlags>
constexpr bool has_state(int k) {
  return k < num_states<Rule>() && state_present<Rule>(kFlags, k);
}

// One element: the rule's update of p (given as `pi`) with the gradient `gi` (unscaled, and
// negated when maximizing), its states loaded from and stored to the state pointers present
// under kFlags; returns the new parameter as stored.
template <typename Rule, unsigned kFlags, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
__attribute__((always_inline)) inline scalar_t update_element(int64_t i, opmath_t pi, opmath_t gi, scalar_t* __restrict__ s0,
                                                              scalar_t* __restrict__ s1, scalar_t* __restrict__ s2,
                                                              const ConstsOf<Rule, scalar_t>& c) {
  constexpr int kStates = num_states<Rule>();
  constexpr bool k0 = has_state<Rule, kFlags>(0), k1 = has_state<Rule, kFlags>(1), k2 = has_state<Rule, kFlags>(2);
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
// element. The strided loop (fused_optim.cpp: transposed or sliced tensors, rare) reads the flags at
// run time.
//
// A measured step (`sums`: fused_op.h's kStat columns) runs the same update with the sums in the
// loop. Element i of a call adds its squares to lane i % kStatsLanes, and `omp simd` runs the
// lanes as one vector (two or four on narrower instruction sets). The lanes sum a block of
// kStatsBlock elements in the math type (float32 rounding of a sum of 16 squares, not of
// thousands), then add into lanes of doubles, which are summed once, at the end of the call. The
// lane count is fixed, not the vector width, so every instruction-set clone gives the same bits
// (an `omp simd reduction` per block gave AVX2 and AVX-512 different sums; its cost was the same).
// The squares are fused multiply-adds; the non-finite count is taken only when the call's
// squared-gradient sum is not finite (a NaN or inf gradient makes it so).
constexpr int kStatsLanes = 16;
constexpr int64_t kStatsBlock = 256;
// Out of cache, the measured loop asks for the lines 4 KB ahead of it: with its sums it has more
// instructions between loads than the plain loop, so fewer of its loads are in flight, and one
// core streamed slower (16M floats, stats/plain 1.10-1.15x for SGD and Adam on a 2-vCPU Xeon;
// with these prefetches 0.96-0.97x and 1.03-1.05x). The plain loop has none yet: in the micro
// they sped it up out of cache and slowed it in cache (design note).
constexpr int64_t kPrefetchAhead = 1024;

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
    double lanes[3][kStatsLanes] = {};  // update, parameter, gradient squares
    for (int64_t start = 0; start < n; start += kStatsBlock) {
      const int64_t end = std::min(n, start + kStatsBlock);
      opmath_t update_sq[kStatsLanes] = {}, param_sq[kStatsLanes] = {}, grad_sq[kStatsLanes] = {};
      const auto measured_update = [&](int64_t i, int lane) __attribute__((always_inline)) {
        const opmath_t before = p[i];
        opmath_t gi = g[i];
        if constexpr (kScaled) gi = gi / scale;
        const scalar_t after = update_element<Rule, kFlags>(i, before, gi * sign, s0, s1, s2, c);
        p[i] = after;
        const opmath_t d = static_cast<opmath_t>(after) - before;  // exact when below the weight
        update_sq[lane] = std::fma(d, d, update_sq[lane]);
        param_sq[lane] = std::fma(before, before, param_sq[lane]);
        grad_sq[lane] = std::fma(gi, gi, grad_sq[lane]);
      };
      int64_t i = start;
      for (; i + kStatsLanes <= end; i += kStatsLanes) {
        if (i + kPrefetchAhead < n) {  // a cache line of each stream, 16 floats
          __builtin_prefetch(p + i + kPrefetchAhead, 1);
          __builtin_prefetch(g + i + kPrefetchAhead, 0);
          if constexpr (has_state<Rule, kFlags>(0)) __builtin_prefetch(s0 + i + kPrefetchAhead, 1);
          if constexpr (has_state<Rule, kFlags>(1)) __builtin_prefetch(s1 + i + kPrefetchAhead, 1);
          if constexpr (has_state<Rule, kFlags>(2)) __builtin_prefetch(s2 + i + kPrefetchAhead, 1);
        }
#pragma omp simd
        for (int lane = 0; lane < kStatsLanes; ++lane) measured_update(i + lane, lane);
      }
      for (int lane = 0; i < end; ++i, ++lane) measured_update(i, lane);
      // Lane by lane, so as vectors: the same bits, and scalar this was 10% of an in-cache step.
#pragma omp simd
      for (int lane = 0; lane < kStatsLanes; ++lane) {
        lanes[0][lane] += update_sq[lane];
        lanes[1][lane] += param_sq[lane];
        lanes[2][lane] += grad_sq[lane];
      }
    }
    double total[3] = {};
    for (int k = 0; k < 3; ++k)
      for (int lane = 0; lane < kStatsLanes; ++lane) total[k] += lanes[k][lane];
    sums[kUpdateSq] += total[0];
    sums[kParamSq] += total[1];
    sums[kGradSq] += total[2];
    if (!std::isfinite(total[2])) sums[kNonfinite] += count_nonfinite<scalar_t, kScaled>(n, g, scale);
  }
}

template <typename Rule, typename scalar_t>
using FlatLoop = void (*)(int64_t, scalar_t*, const scalar_t*, scalar_t*, scalar_t*, scalar_t*,
                          ConstsOf<Rule, scalar_t>, at::opmath_type<scalar_t>, at::opmath_type<scalar_t>, double*);

// Every specialisation of `flat` for one value of kMeasured: entry 2 * flags + scaled.
template <typename Rule, typename scalar_t, bool kMeasured, size_t... I>
constexpr std::array<FlatLoop<Rule, scalar_t>, sizeof...(I)> flat_loops(std::index_sequence<I...>) {
  return {&flat<Rule, static_cast<unsigned>(I / 2), I % 2 == 1, kMeasured, scalar_t>...};
}

// The loop for a tensor: its rule, its dtype, measured or not, its flags, and whether it divides
// by a grad_scale.
template <typename Rule, typename scalar_t, bool kMeasured>
FlatLoop<Rule, scalar_t> flat_loop(unsigned flags, bool scaled) {
  static const auto loops = flat_loops<Rule, scalar_t, kMeasured>(std::make_index_sequence<2u << Rule::kNumFlags>());
  return loops[2 * flags + scaled];
}

// `extern` (declare) or nothing (instantiate): flat_loop of one rule for every dtype, measured or not.
#define LRFUSE_CPU_LOOPS(kind, Rule, measured)                                                  \
  kind template FlatLoop<Rule, float> flat_loop<Rule, float, measured>(unsigned, bool);           \
  kind template FlatLoop<Rule, double> flat_loop<Rule, double, measured>(unsigned, bool);         \
  kind template FlatLoop<Rule, at::Half> flat_loop<Rule, at::Half, measured>(unsigned, bool);     \
  kind template FlatLoop<Rule, at::BFloat16> flat_loop<Rule, at::BFloat16, measured>(unsigned, bool);

}  // namespace lrfuse::cpu
