// Per-element update rules of Adam / AdamW and RMSprop, shared by the CPU and CUDA kernels.
//
// The order of operations follows torch.optim's for-loop implementation op by op (lerp_,
// mul_ + addcmul_, sqrt / div / add_, addcdiv_), each with that op's own formula, so the fused
// update agrees with torch to rounding. One departure: Adam multiplies sqrt(v) by
// 1 / sqrt(bias_correction2) where torch divides. That changes the denominator by at most one
// rounding (far inside torch's float32 tolerance) and saves a divide per element, which is what
// bounds an in-cache step (divide and square root are the slowest vector instructions).
// Where torch's ops round once, so do these: `a.add(b, alpha=s)` is fma(s, b, a) and
// `a.addcmul(b, c, value=s)` is fma(s * b, c, a) in torch's CPU kernels (nvcc contracts the GPU's
// alike), so they are written as std::fma here. It matters most for coupled weight decay: near an
// L2-regularised optimum, where the gradient nearly cancels the decay, rounding `wd * p` first
// would move the result by far more than an ulp.
// Scalars that torch computes as Python floats (bias corrections, step size) are computed here
// in double from the float64 hyper table, then cast to the math type, as torch casts a Python
// scalar.
#pragma once

#include <cmath>

#include "host_device.h"

namespace lrfuse {

// Columns of the per-group hyper-parameter table (float64, one row per parameter group).
// The Python side builds the rows from param_groups: keep in sync with
// ADAM_COLUMNS / RMSPROP_COLUMNS in lrfuse/ops/__init__.py (a test checks it).
// Which optional state a call carries (amsgrad, momentum, centered) is not a column: it is
// structural, known on the host from the lengths of the state lists.
namespace adam_col {
enum : int { lr, beta1, beta2, eps, weight_decay, maximize, decoupled, count };
}
namespace rmsprop_col {
enum : int { lr, alpha, eps, weight_decay, momentum, maximize, count };
}

// torch's lerp, as its CPU vector kernel computes it (one fused multiply-add; nvcc contracts the
// GPU's to the same): the branch keeps precision when the weight is large.
template <typename T>
LRFUSE_HD T lerp(T self, T end, T weight) {
  return (weight < T(0.5) && weight > T(-0.5)) ? std::fma(weight, end - self, self)
                                                : std::fma(weight - T(1), end - self, end);
}

// torch.maximum propagates NaN.
template <typename T>
LRFUSE_HD T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// Per tensor and step: everything the element loop needs, computed once.
template <typename T>
struct AdamConsts {
  T weight_decay, lr_decay;  // Adam: g += wd * p.  AdamW: p *= 1 - lr * wd.
  T lerp_weight;             // 1 - beta1
  T beta2, one_minus_beta2;
  T inv_bias_correction2_sqrt, eps, neg_step_size;  // 1 / sqrt(1 - beta2^t), -lr / (1 - beta1^t)
  bool maximize, amsgrad, decoupled, has_weight_decay;
};

template <typename T>
LRFUSE_HD AdamConsts<T> adam_consts(const double* row, double step, bool amsgrad_) {
  using namespace adam_col;
  const double lr_ = row[lr], b1 = row[beta1], b2 = row[beta2], wd = row[weight_decay];
  AdamConsts<T> c;
  c.weight_decay = T(wd);
  c.lr_decay = T(1.0 - lr_ * wd);
  c.lerp_weight = T(1.0 - b1);
  c.beta2 = T(b2);
  c.one_minus_beta2 = T(1.0 - b2);
  c.inv_bias_correction2_sqrt = T(1.0 / std::sqrt(1.0 - std::pow(b2, step)));
  c.eps = T(row[eps]);
  c.neg_step_size = T(-(lr_ / (1.0 - std::pow(b1, step))));
  c.maximize = row[maximize] != 0.0;
  c.amsgrad = amsgrad_;
  c.decoupled = row[decoupled] != 0.0;
  c.has_weight_decay = wd != 0.0;
  return c;
}

// One element of Adam / AdamW. `g` is already unscaled; `max_v` is read only when amsgrad.
template <typename T>
LRFUSE_HD void adam_update(T& p, T g, T& m, T& v, T& max_v, const AdamConsts<T>& c) {
  if (c.maximize) g = -g;
  if (c.has_weight_decay) {
    if (c.decoupled) p = p * c.lr_decay;
    else g = std::fma(c.weight_decay, p, g);
  }
  m = lerp(m, g, c.lerp_weight);
  v = std::fma(c.one_minus_beta2 * g, g, v * c.beta2);
  T second = v;
  if (c.amsgrad) {
    max_v = nan_max(max_v, v);
    second = max_v;
  }
  const T denom = std::sqrt(second) * c.inv_bias_correction2_sqrt + c.eps;
  p = p + c.neg_step_size * m / denom;
}

template <typename T>
struct RMSpropConsts {
  T alpha, one_minus_alpha, eps, weight_decay, momentum, neg_lr;
  bool maximize, centered, has_weight_decay, has_momentum;
};

template <typename T>
LRFUSE_HD RMSpropConsts<T> rmsprop_consts(const double* row, bool centered_, bool momentum_) {
  using namespace rmsprop_col;
  RMSpropConsts<T> c;
  c.alpha = T(row[alpha]);
  c.one_minus_alpha = T(1.0 - row[alpha]);
  c.eps = T(row[eps]);
  c.weight_decay = T(row[weight_decay]);
  c.momentum = T(row[momentum]);
  c.neg_lr = T(-row[lr]);
  c.maximize = row[maximize] != 0.0;
  c.centered = centered_;
  c.has_weight_decay = row[weight_decay] != 0.0;
  c.has_momentum = momentum_;
  return c;
}

// One element of RMSprop. `buf` is read only with momentum, `grad_avg` only when centered.
template <typename T>
LRFUSE_HD void rmsprop_update(T& p, T g, T& square_avg, T& buf, T& grad_avg,
                              const RMSpropConsts<T>& c) {
  if (c.maximize) g = -g;
  if (c.has_weight_decay) g = std::fma(c.weight_decay, p, g);
  square_avg = std::fma(c.one_minus_alpha * g, g, square_avg * c.alpha);
  T avg;
  if (c.centered) {
    grad_avg = lerp(grad_avg, g, c.one_minus_alpha);
    avg = std::sqrt(std::fma(-grad_avg, grad_avg, square_avg));
  } else {
    avg = std::sqrt(square_avg);
  }
  avg = avg + c.eps;
  if (c.has_momentum) {
    buf = buf * c.momentum + g / avg;
    p = std::fma(c.neg_lr, buf, p);
  } else {
    p = p + c.neg_lr * g / avg;
  }
}

}  // namespace lrfuse
