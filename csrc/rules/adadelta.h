// Adadelta (torch.optim.Adadelta, for-loop implementation).
#pragma once

#include "rule.h"

namespace lrfuse {

struct Adadelta {
  static constexpr const char* kName = "adadelta";
  static constexpr std::array<const char*, 2> kStates{"square_avg", "acc_delta"};
  static constexpr std::array<const char*, 0> kOptionalStates{};
  enum Column : int { lr, rho, eps, weight_decay, maximize, kColumns };
  static constexpr bool kCountsSteps = true;
  enum State : int { square_avg, acc_delta };
  enum Flag : unsigned { kWeightDecay = 1, kNumFlags = 1 };

  template <typename T>
  struct Consts {
    T rho, one_minus_rho, eps, weight_decay, neg_lr;
    unsigned switches;
  };

  template <typename T>
  static LRFUSE_HD Consts<T> consts(const double* row, double /*step*/) {
    Consts<T> c;
    c.rho = T(row[rho]);
    c.one_minus_rho = T(1.0 - row[rho]);
    c.eps = T(row[eps]);
    c.weight_decay = T(row[weight_decay]);
    c.neg_lr = T(-row[lr]);
    c.switches = row[weight_decay] != 0.0 ? kWeightDecay : 0u;
    return c;
  }

  template <typename T, typename F>
  static LRFUSE_HD void update(T& p, T g, T* s, const Consts<T>& c, F flags) {
    if (has(flags, kWeightDecay)) g = std::fma(c.weight_decay, p, g);
    s[square_avg] = decay_add_square(s[square_avg], c.rho, c.one_minus_rho, g);
    const T std_ = std::sqrt(s[square_avg] + c.eps);
    const T delta = std::sqrt(s[acc_delta] + c.eps) / std_ * g;
    s[acc_delta] = decay_add_square(s[acc_delta], c.rho, c.one_minus_rho, delta);
    p = std::fma(c.neg_lr, delta, p);
  }
};

}  // namespace lrfuse
