// The CUDA backend's ops with the GPU taken out, for the CPU tests (tests/test_cuda.py, device
// "emulated"). Everything from the tensor lists to the launches is csrc/cuda/fused_call.h's and
// everything a block computes is csrc/cuda/kernels.h's, as on the GPU; only the launcher
// differs: it runs a launch's blocks one after another, and in each block thread 0's constants
// first, then every thread's share of the chunk, as the kernel's __syncthreads orders them.
// What this leaves untested is what only a GPU shows: its loads and stores, its rounding (nvcc
// contracts multiply-adds), races, and the CUDA runtime.
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "cuda/fused_call.h"

namespace lrfuse::cuda {
namespace {

struct HostLauncher {
  template <typename Block>
  static void launch(const typename Block::Meta& meta, int blocks, const Common& common) {
    if (skip_step(common.found_inf)) return;
    for (int b = 0; b < blocks; ++b) {
      const typename Block::Consts consts = Block::consts(meta, common, b);
      for (int t = 0; t < kBlockSize; ++t) Block::update(meta, common, b, t, kBlockSize, consts);
    }
  }

  static void increment_steps(const std::vector<float*>& steps, const float* found_inf) {
    if (skip_step(found_inf)) return;
    for (float* step : steps) *step += 1.0f;
  }
};

using List = std::vector<at::Tensor>;

void fused_adam_(const List& params, const List& grads, const List& exp_avgs, const List& exp_avg_sqs,
                 const List& max_exp_avg_sqs, const List& steps, const std::vector<int64_t>& group_of,
                 const at::Tensor& hyper, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf) {
  fused_adam<HostLauncher>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_of,
                           common_of(hyper, grad_scale, found_inf));
}

void fused_rmsprop_(const List& params, const List& grads, const List& square_avgs, const List& momentum_buffers,
                    const List& grad_avgs, const List& steps, const std::vector<int64_t>& group_of,
                    const at::Tensor& hyper, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  fused_rmsprop<HostLauncher>(params, grads, square_avgs, momentum_buffers, grad_avgs, steps, group_of,
                              common_of(hyper, grad_scale, found_inf));
}

}  // namespace
}  // namespace lrfuse::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_adam_", &lrfuse::cuda::fused_adam_, "the CUDA backend's fused_adam_, run on the host");
  m.def("fused_rmsprop_", &lrfuse::cuda::fused_rmsprop_, "the CUDA backend's fused_rmsprop_, run on the host");
}
