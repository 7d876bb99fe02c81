// Adam and AdamW (torch.optim.Adam / AdamW, for-loop implementation).
//
// One departure from torch: the denominator multiplies sqrt(v) by 1 / sqrt(bias_correction2)
// where torch divides. That moves it by at most one rounding (far inside torch's float32
// tolerance) and saves a divide per element, which is what bounds an in-cache step (divide and
// square root are the slowest vector instructions).
#pragma once

#include "rule.h"

namespace lrfuse {

struct Adam {
  static constexpr const char* kName = "adam";
  static constexpr std::array<const char*, 2> kStates{"exp_avg", "exp_avg_sq"};
  static constexpr std::array<const char*, 1> kOptionalStates{"max_exp_avg_sq"};
  enum Column : int { lr, beta1, beta2, eps, weight_decay, maximize, decoupled, kColumns };
  static constexpr bool kCountsSteps = true;
  enum State : int { exp_avg, exp_avg_sq, max_exp_avg_sq };
  enum Flag : unsigned { kAmsgrad = 1, kWeightDecay = 2, kDecoupled = 4, kNumFlags = 3 };

  template <typename T>
  struct Consts {
    T weight_decay, lr_decay;  // Adam: g += wd * p.  AdamW: p *= 1 - lr * wd.
    T lerp_weight;             // 1 - beta1
    T beta2, one_minus_beta2;
    T inv_bias_correction2_sqrt, eps, neg_step_size;  // 1 / sqrt(1 - beta2^t), -lr / (1 - beta1^t)
    unsigned switches;
  };

  template <typename T>
  static LRFUSE_HD Consts<T> consts(const double* row, double step) {
    const double lr_ = row[lr], b1 = row[beta1], b2 = row[beta2], wd = row[weight_decay];
    Consts<T> c;
    c.weight_decay = T(wd);
    c.lr_decay = T(1.0 - lr_ * wd);
    c.lerp_weight = T(1.0 - b1);
    c.beta2 = T(b2);
    c.one_minus_beta2 = T(1.0 - b2);
    c.inv_bias_correction2_sqrt = T(1.0 / std::sqrt(1.0 - std::pow(b2, step)));
    c.eps = T(row[eps]);
    c.neg_step_size = T(-(lr_ / (1.0 - std::pow(b1, step))));
    c.switches = (wd != 0.0 ? kWeightDecay : 0u) | (row[decoupled] != 0.0 ? kDecoupled : 0u);
    return c;
  }

  template <typename T, typename F>
  static LRFUSE_HD void update(T& p, T g, T* s, const Consts<T>& c, F flags) {
    if (has(flags, kWeightDecay)) {
      if (has(flags, kDecoupled)) p = p * c.lr_decay;
      else g = std::fma(c.weight_decay, p, g);
    }
    T& m = s[exp_avg];
    T& v = s[exp_avg_sq];
    m = lerp(m, g, c.lerp_weight);
    v = decay_add_square(v, c.beta2, c.one_minus_beta2, g);
    T second = v;
    if (has(flags, kAmsgrad)) {
      s[max_exp_avg_sq] = nan_max(s[max_exp_avg_sq], v);
      second = s[max_exp_avg_sq];
    }
    const T denom = std::sqrt(second) * c.inv_bias_correction2_sqrt + c.eps;
    p = p + c.neg_step_size * m / denom;
  }
};

}  // namespace lrfuse
