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

// The element loops. With kContiguous every stride is 1 and the loop vectorizes; the clones
// give AVX-512, AVX2 and baseline versions, picked for the running processor.
template <typename scalar_t, bool kContiguous>
LRFUSE_CPU_CLONES void adam_loop(int64_t n, std::array<scalar_t*, kMaxOperands> ptr, const int64_t* stride,
                                 const AdamConsts<at::opmath_type<scalar_t>> c, const float* grad_scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* __restrict__ p = ptr[0];
  const scalar_t* __restrict__ g = ptr[1];
  scalar_t* __restrict__ m = ptr[2];
  scalar_t* __restrict__ v = ptr[3];
  scalar_t* __restrict__ vmax = ptr[4];
  const int64_t sp = kContiguous ? 1 : stride[0], sg = kContiguous ? 1 : stride[1],
                sm = kContiguous ? 1 : stride[2], sv = kContiguous ? 1 : stride[3],
                sx = kContiguous ? 1 : stride[4];
  const opmath_t scale = grad_scale ? opmath_t(*grad_scale) : opmath_t(1);
  for (int64_t i = 0; i < n; ++i) {
    opmath_t pi = p[i * sp], gi = g[i * sg], mi = m[i * sm], vi = v[i * sv];
    opmath_t xi = c.amsgrad ? opmath_t(vmax[i * sx]) : opmath_t(0);
    if (grad_scale) gi = gi / scale;
    adam_update(pi, gi, mi, vi, xi, c);
    p[i * sp] = pi;
    m[i * sm] = mi;
    v[i * sv] = vi;
    if (c.amsgrad) vmax[i * sx] = xi;
  }
}

template <typename scalar_t, bool kContiguous>
LRFUSE_CPU_CLONES void rmsprop_loop(int64_t n, std::array<scalar_t*, kMaxOperands> ptr, const int64_t* stride,
                                    const RMSpropConsts<at::opmath_type<scalar_t>> c, const float* grad_scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* __restrict__ p = ptr[0];
  const scalar_t* __restrict__ g = ptr[1];
  scalar_t* __restrict__ sq = ptr[2];
  scalar_t* __restrict__ buf = ptr[3];
  scalar_t* __restrict__ ga = ptr[4];
  const int64_t sp = kContiguous ? 1 : stride[0], sg = kContiguous ? 1 : stride[1],
                ss = kContiguous ? 1 : stride[2], sb = kContiguous ? 1 : stride[3],
                sa = kContiguous ? 1 : stride[4];
  const opmath_t scale = grad_scale ? opmath_t(*grad_scale) : opmath_t(1);
  for (int64_t i = 0; i < n; ++i) {
    opmath_t pi = p[i * sp], gi = g[i * sg], si = sq[i * ss];
    opmath_t bi = c.has_momentum ? opmath_t(buf[i * sb]) : opmath_t(0);
    opmath_t ai = c.centered ? opmath_t(ga[i * sa]) : opmath_t(0);
    if (grad_scale) gi = gi / scale;
    rmsprop_update(pi, gi, si, bi, ai, c);
    p[i * sp] = pi;
    sq[i * ss] = si;
    if (c.has_momentum) buf[i * sb] = bi;
    if (c.centered) ga[i * sa] = ai;
  }
}

// Checks done; an inf/NaN found by GradScaler skips the whole step, `step` included.
bool skip_step(const std::optional<Tensor>& found_inf) {
  return found_inf && *found_inf->data_ptr<float>() != 0.0f;
}

const float* scale_ptr(const std::optional<Tensor>& grad_scale) {
  return grad_scale ? grad_scale->data_ptr<float>() : nullptr;
}

const Tensor* at_or_null(TensorList list, size_t i) { return list.empty() ? nullptr : &list[i]; }

// Steps advance once per tensor, before the parallel region reads them.
std::vector<double> advance_steps(TensorList steps) {
  std::vector<double> values(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    float* s = steps[i].data_ptr<float>();
    values[i] = *s += 1.0f;
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
      const auto c = adam_consts<at::opmath_type<scalar_t>>(row, step[i], amsgrad);
      Plan::for_each_run<scalar_t>(plan.walk(i), lo, hi, [&](auto contiguous, int64_t n, auto ptrs, const int64_t* s) {
        adam_loop<scalar_t, decltype(contiguous)::value>(n, ptrs, s, c, scale);
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
      const auto c = rmsprop_consts<at::opmath_type<scalar_t>>(row, centered, momentum);
      Plan::for_each_run<scalar_t>(plan.walk(i), lo, hi, [&](auto contiguous, int64_t n, auto ptrs, const int64_t* s) {
        rmsprop_loop<scalar_t, decltype(contiguous)::value>(n, ptrs, s, c, scale);
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
