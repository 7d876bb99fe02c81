// CPU kernels of the fused ops: one parallel region per call over every tensor of every group.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../checks.h"
#include "../cpu_isa.h"
#include "../update_rules.h"
#include "plan.h"

namespace lrfuse::cpu {
namespace {

using at::Tensor;
using at::TensorList;

// The element loops. The contiguous loops take every feature switch (amsgrad, weight-decay mode,
// momentum, centered) as a template argument, so the loop body has no branch and no conditional
// load and GCC vectorizes it; the clones give AVX-512, AVX2 and baseline versions, picked for the
// running processor. `maximize` is a multiply by -1 (exact, so the result is the per-element
// rule's bit for bit). The loop has two copies, with and without the grad_scale division: in
// cache (`tiny`) the step is bound by divide/sqrt throughput, and dividing by a missing scale of 1
// would add a second divide to Adam's one divide and one square root per element. The strided
// loops (transposed or sliced tensors, rare) keep the switches at run time.

// Weight decay of Adam: none, added to the gradient (Adam), or decoupled (AdamW).
enum class Decay : int { none, l2, decoupled };

template <bool kAmsgrad, bool kScaled, typename scalar_t, typename opmath_t>
inline __attribute__((always_inline)) void adam_element(int64_t i, scalar_t* __restrict__ p,
                                                        const scalar_t* __restrict__ g, scalar_t* __restrict__ m,
                                                        scalar_t* __restrict__ v, scalar_t* __restrict__ vmax,
                                                        const AdamConsts<opmath_t>& c, opmath_t scale, opmath_t sign) {
  opmath_t pi = p[i], gi = g[i], mi = m[i], vi = v[i];
  opmath_t xi = kAmsgrad ? opmath_t(vmax[i]) : opmath_t(0);
  if (kScaled) gi = gi / scale;
  gi = gi * sign;
  adam_update(pi, gi, mi, vi, xi, c);
  p[i] = pi;
  m[i] = mi;
  v[i] = vi;
  if (kAmsgrad) vmax[i] = xi;
}

template <typename scalar_t, bool kAmsgrad, Decay kDecay>
LRFUSE_CPU_CLONES void adam_flat(int64_t n, scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                 scalar_t* __restrict__ m, scalar_t* __restrict__ v,
                                 scalar_t* __restrict__ vmax, AdamConsts<at::opmath_type<scalar_t>> c,
                                 at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t sign = c.maximize ? opmath_t(-1) : opmath_t(1);
  c.maximize = false;
  c.amsgrad = kAmsgrad;
  c.has_weight_decay = kDecay != Decay::none;
  c.decoupled = kDecay == Decay::decoupled;
  if (scale == opmath_t(1)) {  // no grad_scale, or one of 1: g / 1 == g
    for (int64_t i = 0; i < n; ++i) adam_element<kAmsgrad, false>(i, p, g, m, v, vmax, c, scale, sign);
  } else {
    for (int64_t i = 0; i < n; ++i) adam_element<kAmsgrad, true>(i, p, g, m, v, vmax, c, scale, sign);
  }
}

template <bool kMomentum, bool kCentered, bool kScaled, typename scalar_t, typename opmath_t>
inline __attribute__((always_inline)) void rmsprop_element(int64_t i, scalar_t* __restrict__ p,
                                                           const scalar_t* __restrict__ g, scalar_t* __restrict__ sq,
                                                           scalar_t* __restrict__ buf, scalar_t* __restrict__ ga,
                                                           const RMSpropConsts<opmath_t>& c, opmath_t scale,
                                                           opmath_t sign) {
  opmath_t pi = p[i], gi = g[i], si = sq[i];
  opmath_t bi = kMomentum ? opmath_t(buf[i]) : opmath_t(0);
  opmath_t ai = kCentered ? opmath_t(ga[i]) : opmath_t(0);
  if (kScaled) gi = gi / scale;
  gi = gi * sign;
  rmsprop_update(pi, gi, si, bi, ai, c);
  p[i] = pi;
  sq[i] = si;
  if (kMomentum) buf[i] = bi;
  if (kCentered) ga[i] = ai;
}

template <typename scalar_t, bool kMomentum, bool kCentered, bool kWeightDecay>
LRFUSE_CPU_CLONES void rmsprop_flat(int64_t n, scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                    scalar_t* __restrict__ sq, scalar_t* __restrict__ buf,
                                    scalar_t* __restrict__ ga, RMSpropConsts<at::opmath_type<scalar_t>> c,
                                    at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t sign = c.maximize ? opmath_t(-1) : opmath_t(1);
  c.maximize = false;
  c.has_momentum = kMomentum;
  c.centered = kCentered;
  c.has_weight_decay = kWeightDecay;
  if (scale == opmath_t(1)) {  // no grad_scale, or one of 1: g / 1 == g
    for (int64_t i = 0; i < n; ++i)
      rmsprop_element<kMomentum, kCentered, false>(i, p, g, sq, buf, ga, c, scale, sign);
  } else {
    for (int64_t i = 0; i < n; ++i)
      rmsprop_element<kMomentum, kCentered, true>(i, p, g, sq, buf, ga, c, scale, sign);
  }
}

template <typename scalar_t>
void adam_strided(int64_t n, std::array<scalar_t*, kMaxOperands> ptr, const int64_t* stride,
                  const AdamConsts<at::opmath_type<scalar_t>>& c, at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t *p = ptr[0], *m = ptr[2], *v = ptr[3], *vmax = ptr[4];
  const scalar_t* g = ptr[1];
  for (int64_t i = 0; i < n; ++i) {
    opmath_t pi = p[i * stride[0]], gi = g[i * stride[1]], mi = m[i * stride[2]], vi = v[i * stride[3]];
    opmath_t xi = c.amsgrad ? opmath_t(vmax[i * stride[4]]) : opmath_t(0);
    gi = gi / scale;
    adam_update(pi, gi, mi, vi, xi, c);
    p[i * stride[0]] = pi;
    m[i * stride[2]] = mi;
    v[i * stride[3]] = vi;
    if (c.amsgrad) vmax[i * stride[4]] = xi;
  }
}

template <typename scalar_t>
void rmsprop_strided(int64_t n, std::array<scalar_t*, kMaxOperands> ptr, const int64_t* stride,
                     const RMSpropConsts<at::opmath_type<scalar_t>>& c, at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t *p = ptr[0], *sq = ptr[2], *buf = ptr[3], *ga = ptr[4];
  const scalar_t* g = ptr[1];
  for (int64_t i = 0; i < n; ++i) {
    opmath_t pi = p[i * stride[0]], gi = g[i * stride[1]], si = sq[i * stride[2]];
    opmath_t bi = c.has_momentum ? opmath_t(buf[i * stride[3]]) : opmath_t(0);
    opmath_t ai = c.centered ? opmath_t(ga[i * stride[4]]) : opmath_t(0);
    gi = gi / scale;
    rmsprop_update(pi, gi, si, bi, ai, c);
    p[i * stride[0]] = pi;
    sq[i * stride[2]] = si;
    if (c.has_momentum) buf[i * stride[3]] = bi;
    if (c.centered) ga[i * stride[4]] = ai;
  }
}

// A pointer to the flat loop for one combination of switches, chosen once per call.
template <typename scalar_t>
using AdamFlat = void (*)(int64_t, scalar_t*, const scalar_t*, scalar_t*, scalar_t*, scalar_t*,
                          AdamConsts<at::opmath_type<scalar_t>>, at::opmath_type<scalar_t>);

template <typename scalar_t, bool kAmsgrad>
AdamFlat<scalar_t> pick_adam(Decay decay) {
  switch (decay) {
    case Decay::none: return &adam_flat<scalar_t, kAmsgrad, Decay::none>;
    case Decay::l2: return &adam_flat<scalar_t, kAmsgrad, Decay::l2>;
    default: return &adam_flat<scalar_t, kAmsgrad, Decay::decoupled>;
  }
}

template <typename scalar_t>
AdamFlat<scalar_t> pick_adam(bool amsgrad, Decay decay) {
  return amsgrad ? pick_adam<scalar_t, true>(decay) : pick_adam<scalar_t, false>(decay);
}

template <typename scalar_t>
using RMSpropFlat = void (*)(int64_t, scalar_t*, const scalar_t*, scalar_t*, scalar_t*, scalar_t*,
                             RMSpropConsts<at::opmath_type<scalar_t>>, at::opmath_type<scalar_t>);

template <typename scalar_t, bool kMomentum, bool kCentered>
RMSpropFlat<scalar_t> pick_rmsprop(bool weight_decay) {
  return weight_decay ? &rmsprop_flat<scalar_t, kMomentum, kCentered, true>
                      : &rmsprop_flat<scalar_t, kMomentum, kCentered, false>;
}

template <typename scalar_t>
RMSpropFlat<scalar_t> pick_rmsprop(bool momentum, bool centered, bool weight_decay) {
  if (momentum) {
    return centered ? pick_rmsprop<scalar_t, true, true>(weight_decay)
                    : pick_rmsprop<scalar_t, true, false>(weight_decay);
  }
  return centered ? pick_rmsprop<scalar_t, false, true>(weight_decay)
                  : pick_rmsprop<scalar_t, false, false>(weight_decay);
}

// Checks done; an inf/NaN found by GradScaler skips the whole step, `step` included.
bool skip_step(const std::optional<Tensor>& found_inf) {
  return found_inf && *found_inf->data_ptr<float>() != 0.0f;
}

const float* scale_ptr(const std::optional<Tensor>& grad_scale) {
  return grad_scale ? grad_scale->data_ptr<float>() : nullptr;
}

const Tensor* at_or_null(TensorList list, size_t i) { return list.empty() ? nullptr : &list[i]; }

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

void fused_adam_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                    TensorList max_exp_avg_sqs, TensorList steps, at::IntArrayRef group_of,
                    const Tensor& hyper, const std::optional<Tensor>& grad_scale,
                    const std::optional<Tensor>& found_inf) {
  check_fused_args({"fused_adam_", params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
                    {{"max_exp_avg_sqs", max_exp_avg_sqs}}, steps, group_of, hyper, adam_col::count,
                    grad_scale, found_inf});
  if (params.empty() || skip_step(found_inf)) return;
  const bool amsgrad = !max_exp_avg_sqs.empty();
  Plan plan(params.size());
  for (size_t i = 0; i < params.size(); ++i)
    plan.add({&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i], at_or_null(max_exp_avg_sqs, i)});
  const std::vector<double> step = advance_steps(steps);
  const double* table = hyper.data_ptr<double>();
  const float* scale = scale_ptr(grad_scale);
  plan.run([&](size_t i, int64_t lo, int64_t hi) {
    const double* row = table + group_of[i] * adam_col::count;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[i].scalar_type(), "fused_adam_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto c = adam_consts<opmath_t>(row, step[i], amsgrad);
      const opmath_t scale_value = scale ? opmath_t(*scale) : opmath_t(1);
      const Decay decay = !c.has_weight_decay ? Decay::none : c.decoupled ? Decay::decoupled : Decay::l2;
      Plan::for_each_run<scalar_t>(plan.walk(i), lo, hi, [&](auto contiguous, int64_t n, auto ptrs, const int64_t* s) {
        if constexpr (decltype(contiguous)::value) {
          pick_adam<scalar_t>(amsgrad, decay)(n, ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], c, scale_value);
        } else {
          adam_strided<scalar_t>(n, ptrs, s, c, scale_value);
        }
      });
    });
  });
}

void fused_rmsprop_cpu(TensorList params, TensorList grads, TensorList square_avgs, TensorList momentum_buffers,
                       TensorList grad_avgs, TensorList steps, at::IntArrayRef group_of, const Tensor& hyper,
                       const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  check_fused_args({"fused_rmsprop_", params, grads, {{"square_avgs", square_avgs}},
                    {{"momentum_buffers", momentum_buffers}, {"grad_avgs", grad_avgs}}, steps, group_of, hyper,
                    rmsprop_col::count, grad_scale, found_inf});
  if (params.empty() || skip_step(found_inf)) return;
  const bool momentum = !momentum_buffers.empty(), centered = !grad_avgs.empty();
  Plan plan(params.size());
  for (size_t i = 0; i < params.size(); ++i)
    plan.add({&params[i], &grads[i], &square_avgs[i], at_or_null(momentum_buffers, i), at_or_null(grad_avgs, i)});
  advance_steps(steps);
  const double* table = hyper.data_ptr<double>();
  const float* scale = scale_ptr(grad_scale);
  plan.run([&](size_t i, int64_t lo, int64_t hi) {
    const double* row = table + group_of[i] * rmsprop_col::count;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[i].scalar_type(), "fused_rmsprop_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto c = rmsprop_consts<opmath_t>(row, centered, momentum);
      const opmath_t scale_value = scale ? opmath_t(*scale) : opmath_t(1);
      Plan::for_each_run<scalar_t>(plan.walk(i), lo, hi, [&](auto contiguous, int64_t n, auto ptrs, const int64_t* s) {
        if constexpr (decltype(contiguous)::value) {
          pick_rmsprop<scalar_t>(momentum, centered, c.has_weight_decay)(n, ptrs[0], ptrs[1], ptrs[2], ptrs[3],
                                                                        ptrs[4], c, scale_value);
        } else {
          rmsprop_strided<scalar_t>(n, ptrs, s, c, scale_value);
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lrfuse, CPU, m) {
  m.impl("fused_adam_", &fused_adam_cpu);
  m.impl("fused_rmsprop_", &fused_rmsprop_cpu);
}

}  // namespace lrfuse::cpu
