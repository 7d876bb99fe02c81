// Adagrad (torch.optim.Adagrad, for-loop implementation).
#pragma once

#include "rule.h"

namespace lrfuse {

struct Adagrad {
  static constexpr const char* kName = "adagrad";
  static constexpr std::array<const char*, 1> kStates{"sum"};
  static constexpr std::array<const char*, 0> kOptionalStates{};
  enum Column : int { lr, lr_decay, weight_decay, eps, maximize, kColumns };
  static constexpr bool kCountsSteps = true;
  enum State : int { sum };
  enum Flag : unsigned { kWeightDecay = 1, kNumFlags = 1 };

  template <typename T>
  struct Consts {
    T weight_decay, eps, neg_clr;  // -lr / (1 + (t - 1) * lr_decay)
    unsigned switches;
  };

  template <typename T>
  static LRFUSE_HD Consts<T> consts(const double* row, double step) {
    Consts<T> c;
    c.weight_decay = T(row[weight_decay]);
    c.eps = T(row[eps]);
    c.neg_clr = T(-(row[lr] / (1.0 + (step - 1.0) * row[lr_decay])));
    c.switches = row[weight_decay] != 0.0 ? kWeightDecay : 0u;
    return c;
  }

  template <typename T, typename F>
  static LRFUSE_HD void update(T& p, T g, T* s, const Consts<T>& c, F flags) {
    if (has(flags, kWeightDecay)) g = std::fma(c.weight_decay, p, g);
    s[sum] = std::fma(g, g, s[sum]);
    p = p + c.neg_clr * g / (std::sqrt(s[sum]) + c.eps);
  }
};

}  // namespace lrfuse
