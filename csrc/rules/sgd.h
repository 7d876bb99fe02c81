// SGD with momentum, dampening and Nesterov (torch.optim.SGD, for-loop implementation).
//
// torch starts a momentum buffer as a copy of the first gradient, not as decay of zeros. The
// per-tensor "this buffer is new" travels in the group index: the Python side gives SGD's hyper
// table a second copy of every group's row with `first_step` = 1 and points new buffers' tensors
// at it, so one call still covers every tensor. torch keeps no `step` for SGD, nor does this op.
#pragma once

#include "rule.h"

namespace lrfuse {

struct SGD {
  static constexpr const char* kName = "sgd";
  static constexpr std::array<const char*, 0> kStates{};
  static constexpr std::array<const char*, 1> kOptionalStates{"momentum_buffer"};
  enum Column : int { lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, kColumns };
  static constexpr bool kCountsSteps = false;
  enum State : int { momentum_buffer };
  enum Flag : unsigned { kMomentum = 1, kWeightDecay = 2, kNesterov = 4, kFirstStep = 8, kNumFlags = 4 };

  template <typename T>
  struct Consts {
    T momentum, one_minus_dampening, weight_decay, neg_lr;
    unsigned switches;
  };

  template <typename T>
  static LRFUSE_HD Consts<T> consts(const double* row, double /*step*/) {
    Consts<T> c;
    c.momentum = T(row[momentum]);
    c.one_minus_dampening = T(1.0 - row[dampening]);
    c.weight_decay = T(row[weight_decay]);
    c.neg_lr = T(-row[lr]);
    c.switches = (row[weight_decay] != 0.0 ? kWeightDecay : 0u) | (row[nesterov] != 0.0 ? kNesterov : 0u) |
                 (row[first_step] != 0.0 ? kFirstStep : 0u);
    return c;
  }

  template <typename T, typename F>
  static LRFUSE_HD void update(T& p, T g, T* s, const Consts<T>& c, F flags) {
    if (has(flags, kWeightDecay)) g = std::fma(c.weight_decay, p, g);
    if (has(flags, kMomentum)) {
      T& buf = s[momentum_buffer];
      buf = has(flags, kFirstStep) ? g : std::fma(c.one_minus_dampening, g, buf * c.momentum);
      g = has(flags, kNesterov) ? std::fma(c.momentum, buf, g) : buf;
    }
    p = std::fma(c.neg_lr, g, p);
  }
};

}  // namespace lrfuse
