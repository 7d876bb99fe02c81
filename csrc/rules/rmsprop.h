// RMSprop (torch.optim.RMSprop, for-loop implementation).
#pragma once

#include "rule.h"

namespace lrfuse {

struct RMSprop {
  static constexpr const char* kName = "rmsprop";
  static constexpr std::array<const char*, 1> kStates{"square_avg"};
  static constexpr std::array<const char*, 2> kOptionalStates{"momentum_buffer", "grad_avg"};
  enum Column : int { lr, alpha, eps, weight_decay, momentum, maximize, kColumns };
  static constexpr bool kCountsSteps = true;
  enum State : int { square_avg, momentum_buffer, grad_avg };
  enum Flag : unsigned { kMomentum = 1, kCentered = 2, kWeightDecay = 4, kNumFlags = 3 };

  template <typename T>
  struct Consts {
    T alpha, one_minus_alpha, eps, weight_decay, momentum, neg_lr;
    unsigned switches;
  };

  template <typename T>
  static LRFUSE_HD Consts<T> consts(const double* row, double /*step*/) {
    Consts<T> c;
    c.alpha = T(row[alpha]);
    c.one_minus_alpha = T(1.0 - row[alpha]);
    c.eps = T(row[eps]);
    c.weight_decay = T(row[weight_decay]);
    c.momentum = T(row[momentum]);
    c.neg_lr = T(-row[lr]);
    c.switches = row[weight_decay] != 0.0 ? kWeightDecay : 0u;
    return c;
  }

  template <typename T, typename F>
  static LRFUSE_HD void update(T& p, T g, T* s, const Consts<T>& c, F flags) {
    if (has(flags, kWeightDecay)) g = std::fma(c.weight_decay, p, g);
    T& sq = s[square_avg];
    sq = decay_add_square(sq, c.alpha, c.one_minus_alpha, g);
    T avg;
    if (has(flags, kCentered)) {
      s[grad_avg] = lerp(s[grad_avg], g, c.one_minus_alpha);
      avg = std::sqrt(std::fma(-s[grad_avg], s[grad_avg], sq));
    } else {
      avg = std::sqrt(sq);
    }
    avg = avg + c.eps;
    if (has(flags, kMomentum)) {
      s[momentum_buffer] = s[momentum_buffer] * c.momentum + g / avg;
      p = std::fma(c.neg_lr, s[momentum_buffer], p);
    } else {
      p = p + c.neg_lr * g / avg;
    }
  }
};

}  // namespace lrfuse
