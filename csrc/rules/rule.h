// What every update rule shares, and what a rule is.
//
// A rule (adam.h, rmsprop.h, ...) is one struct that defines an algorithm once:
//   kName                       the op is `fused_<kName>_`
//   kStates, kOptionalStates    the state lists of the op, in order, named as torch names the state
//                               keys; an optional list is empty (feature off) or has one tensor per
//                               parameter
//   Column, kColumns            the columns of the per-group float64 hyper table
//   kCountsSteps                whether the op takes per-tensor `steps` and advances them
//   Flag                        bit k < kOptionalStates.size(): optional state k is present; the
//                               bits above are the rule's own switches (weight decay on, ...)
//   Consts<T>, consts(row, step)  per tensor and step: what the element loop needs, computed once
//                               from the group's row; `switches` holds the switch bits (in place,
//                               above the optional-state bits)
//   update(p, g, s, c, flags)   one element: `g` is the gradient already unscaled and negated when
//                               maximizing (Column `maximize`, which every rule has and only the
//                               loops read: `gradient_sign`), `s` the states in kStates-then-kOptionalStates order
//                               (an absent optional state reads 0 and is not stored)
// Everything else is generated from that: the op schema and registration (csrc/lrfuse.cpp,
// csrc/cpu, csrc/cuda), the argument checks (checks.h), the CPU loops and the CUDA kernel. `flags`
// is a compile-time constant (std::integral_constant) where the loop is specialised per flag
// combination, so that branches fold away and the CPU loop vectorizes, and a run-time value
// elsewhere: write `if (has(flags, kBit))`.
//
// The order of operations follows torch.optim's for-loop implementation op by op, each with that
// op's own rounding. Where torch's ops round once, so do these: `a.add(b, alpha=s)` is
// fma(s, b, a), `a.addcmul(b, c, value=s)` is fma(s * b, c, a) and lerp is one fma, in torch's
// CPU kernels (nvcc contracts the GPU's alike). It matters most for coupled weight decay: near
// an L2-regularised optimum, where the gradient nearly cancels the decay, rounding `wd * p` first
// would move the result by far more than an ulp. Scalars that torch computes as Python floats
// (bias corrections, step sizes) are computed in double from the float64 row, then cast to the
// math type, as torch casts a Python scalar.
#pragma once

#include <array>
#include <cmath>
#include <type_traits>

#include "../host_device.h"

namespace lrfuse {

template <typename F>
LRFUSE_HD bool has(F flags, unsigned bit) {
  return (static_cast<unsigned>(flags) & bit) != 0;
}

template <unsigned kFlags>
using Flags = std::integral_constant<unsigned, kFlags>;

// torch's lerp, as its CPU vector kernel computes it (one fused multiply-add; nvcc contracts the
// GPU's to the same): the choice keeps precision when the weight is large. Both sides are
// computed and one selected: a select, where a branch would keep the CPU's measured loop (an
// `omp simd` loop) from vectorizing for AVX2; the plain loop runs as fast either way.
template <typename T>
LRFUSE_HD T lerp(T self, T end, T weight) {
  const T small_weight = std::fma(weight, end - self, self), large_weight = std::fma(weight - T(1), end - self, end);
  return (weight < T(0.5) && weight > T(-0.5)) ? small_weight : large_weight;
}

// torch.maximum propagates NaN.
template <typename T>
LRFUSE_HD T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// `v * beta + (1 - beta) * g * g`, as torch's `v.mul_(beta).addcmul_(g, g, value=1 - beta)`.
template <typename T>
LRFUSE_HD T decay_add_square(T v, T beta, T one_minus_beta, T g) {
  return std::fma(one_minus_beta * g, g, v * beta);
}

// -1 when the row's group maximizes, else 1: a multiply by it is exact.
template <typename Rule, typename T>
LRFUSE_HD T gradient_sign(const double* row) {
  return row[Rule::maximize] != 0.0 ? T(-1) : T(1);
}

template <typename Rule>
constexpr int num_states() {
  return static_cast<int>(Rule::kStates.size() + Rule::kOptionalStates.size());
}

}  // namespace lrfuse
