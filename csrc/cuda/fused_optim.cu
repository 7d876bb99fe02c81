// CUDA kernels of the fused ops: every tensor of every group in as few launches as the kernel
// parameter space allows (one per dtype present, more only past hundreds of tensors or 64M
// elements). Learning rate and the other per-group values come from the float64 `hyper` table,
// steps from their 0-d tensors and `grad_scale` / `found_inf` from theirs, all read on the device:
// no host sync, no allocation (but see MultiTensorCall for non-dense operands), current stream,
// so a step can be captured in a CUDA graph and a changed lr is seen on replay.
//
// What a block computes is kernels.h's and how a call becomes launches is fused_call.h's (both
// also run on the host in the CPU tests); this file adds only what needs the GPU: the kernels
// themselves, their launches, and the op registration.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "fused_call.h"

namespace lrfuse::cuda {
namespace {

using at::Tensor;
using at::TensorList;

// One block per chunk. Thread 0 computes the tensor's constants once (the double pow of the bias
// corrections is not repeated by 512 threads) and shares them.
template <typename Block>
__global__ void __launch_bounds__(kBlockSize) fused_kernel(typename Block::Meta meta, Common common) {
  if (skip_step(common.found_inf)) return;
  __shared__ typename Block::Consts shared;
  if (threadIdx.x == 0) shared = Block::consts(meta, common, blockIdx.x);
  __syncthreads();
  Block::update(meta, common, blockIdx.x, threadIdx.x, blockDim.x, shared);
}

__global__ void increment_steps_kernel(StepList list, const float* found_inf) {
  if (skip_step(found_inf)) return;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < list.count; i += gridDim.x * blockDim.x)
    *list.step[i] += 1.0f;
}

struct CudaLauncher {
  template <typename Block>
  static void launch(const typename Block::Meta& meta, int blocks, const Common& common) {
    fused_kernel<Block><<<blocks, kBlockSize, 0, at::cuda::getCurrentCUDAStream()>>>(meta, common);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void increment_steps(const std::vector<float*>& steps, const float* found_inf) {
    StepList list;
    list.count = 0;
    for (size_t i = 0; i < steps.size(); ++i) {
      list.step[list.count++] = steps[i];
      if (list.count == StepList::kMax || i + 1 == steps.size()) {
        increment_steps_kernel<<<(list.count + 255) / 256, 256, 0, at::cuda::getCurrentCUDAStream()>>>(list,
                                                                                                      found_inf);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        list.count = 0;
      }
    }
  }
};

void fused_adam_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                     TensorList max_exp_avg_sqs, TensorList steps, at::IntArrayRef group_of, const Tensor& hyper,
                     const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  check_fused_args({"fused_adam_", params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
                    {{"max_exp_avg_sqs", max_exp_avg_sqs}}, steps, group_of, hyper, adam_col::count,
                    grad_scale, found_inf});
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  fused_adam<CudaLauncher>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_of,
                           common_of(hyper, grad_scale, found_inf));
}

void fused_rmsprop_cuda(TensorList params, TensorList grads, TensorList square_avgs, TensorList momentum_buffers,
                        TensorList grad_avgs, TensorList steps, at::IntArrayRef group_of, const Tensor& hyper,
                        const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  check_fused_args({"fused_rmsprop_", params, grads, {{"square_avgs", square_avgs}},
                    {{"momentum_buffers", momentum_buffers}, {"grad_avgs", grad_avgs}}, steps, group_of, hyper,
                    rmsprop_col::count, grad_scale, found_inf});
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  fused_rmsprop<CudaLauncher>(params, grads, square_avgs, momentum_buffers, grad_avgs, steps, group_of,
                              common_of(hyper, grad_scale, found_inf));
}

}  // namespace

TORCH_LIBRARY_IMPL(lrfuse, CUDA, m) {
  m.impl("fused_adam_", &fused_adam_cuda);
  m.impl("fused_rmsprop_", &fused_rmsprop_cuda);
}

}  // namespace lrfuse::cuda
