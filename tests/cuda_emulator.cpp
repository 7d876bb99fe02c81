// The CUDA backend's ops with the GPU taken out, for the CPU tests (tests/test_cuda.py, device
// "emulated"). Everything from the tensor lists to the launches is csrc/cuda/fused_call.h's and
// everything a block computes is csrc/cuda/kernels.h's, as on the GPU; only the launcher
// differs: it runs a launch's blocks one after another, and in each block thread 0's constants
// first, then every thread's share of the chunk, as the kernel's __syncthreads orders them, and a
// measured call's sums in the device's order (kernels.h's BlockSum).
// What this leaves untested is what only a GPU shows: its loads and stores, its rounding (nvcc
// contracts multiply-adds), races, and the CUDA runtime.
// pybind11 with torch's tensor casters: all the module needs, in a third of torch/extension.h's
// compile time.
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <vector>

#include "cuda/fused_call.h"

namespace lrfuse::cuda {
namespace {

struct HostLauncher {
  template <typename Block>
  static void launch(const typename Block::Meta& meta, int blocks, const Common& common) {
    if (skip_step(common.found_inf)) return;
    double threads[kBlockSize][kStatColumns];
    for (int b = 0; b < blocks; ++b) {
      const typename Block::Consts consts = Block::consts(meta, common, b);
      for (int t = 0; t < kBlockSize; ++t) {
        const auto sums = Block::update(meta, common, b, t, kBlockSize, consts);
        for (int k = 0; k < kStatColumns; ++k) threads[t][k] = sums.v[k];
      }
      if (common.block_stats) {
        double v[kStatColumns];
        BlockSum::host(threads, v);
        double* row = Block::stats_row(meta, common, b);
        for (int k = 0; k < kStatColumns; ++k) row[k] = v[k];
      }
    }
  }

  static void increment_steps(const std::vector<float*>& steps, const float* found_inf) {
    if (skip_step(found_inf)) return;
    for (float* step : steps) *step += 1.0f;
  }

  static void sum_stats(const double* rows, int64_t nrows, double* stats, int groups, const float* found_inf) {
    if (skip_step(found_inf)) return;
    double threads[kBlockSize][kStatColumns];
    for (int g = 0; g < groups; ++g) {
      for (int t = 0; t < kBlockSize; ++t) {
        for (int k = 0; k < kStatColumns; ++k) threads[t][k] = 0.0;
        group_share(rows, nrows, g, t, kBlockSize, threads[t]);
      }
      double v[kStatColumns];
      BlockSum::host(threads, v);
      for (int k = 0; k < kStatColumns; ++k) stats[g * kStatColumns + k] += v[k];
    }
  }
};

using List = std::vector<at::Tensor>;

// fused_<rule>_ with its state lists in one list, for every rule.
void fused_op(const std::string& rule, const List& params, const List& grads, const std::vector<List>& states,
              const List& steps, const std::vector<int64_t>& group_of, const at::Tensor& hyper,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& stats) {
  TORCH_CHECK(states.size() <= kMaxStates, "too many state lists");
  FusedCall call{params, grads, {}, steps, group_of, hyper, grad_scale, found_inf, stats};
  for (size_t k = 0; k < states.size(); ++k) call.states[k] = states[k];
  bool found = false;
#define LRFUSE_EMULATE(Rule)                                                    \
  if (rule == Rule::kName) {                                                    \
    TORCH_CHECK(states.size() == num_states<Rule>(), "wrong number of states"); \
    check_call<Rule>(call);                                                     \
    fused<HostLauncher, Rule>(call);                                            \
    found = true;                                                               \
  }
  LRFUSE_RULES(LRFUSE_EMULATE)
#undef LRFUSE_EMULATE
  TORCH_CHECK(found, "no rule named ", rule);
}

}  // namespace
}  // namespace lrfuse::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused", &lrfuse::cuda::fused_op, "the CUDA backend's fused_<rule>_, run on the host");
}
