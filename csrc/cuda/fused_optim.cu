// CUDA kernels of the fused ops: every tensor of every group in as few launches as the kernel
// parameter space allows (one per dtype present, more only past hundreds of tensors or 64M
// elements). Learning rate and the other per-group values come from the float64 `hyper` table,
// steps from their 0-d tensors and `grad_scale` / `found_inf` from theirs, all read on the device:
// no host sync, no allocation (but see MultiTensorCall for non-dense operands, and a measured
// call's scratch rows, from the caching allocator), current stream,
// so a step can be captured in a CUDA graph and a changed lr is seen on replay.
//
// What a block computes is kernels.h's and how a call becomes launches is fused_call.h's (both
// also run on the host in the CPU tests); this file adds only what needs the GPU: the kernels
// themselves, their launches, and the op registration.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fused_call.h"

namespace lrfuse::cuda {
namespace {

using at::Tensor;
using at::TensorList;

// One block per chunk. Thread 0 computes the tensor's constants once (the double pow of the bias
// corrections is not repeated by 512 threads) and shares them. A measured call's block then sums
// its threads' figures (BlockSum) into its BlockStats row.
template <typename Block>
__global__ void __launch_bounds__(kBlockSize) fused_kernel(typename Block::Meta meta, Common common) {
  if (skip_step(common.found_inf)) return;
  __shared__ typename Block::Consts shared;
  if (threadIdx.x == 0) shared = Block::consts(meta, common, blockIdx.x);
  __syncthreads();
  const auto sums = Block::update(meta, common, blockIdx.x, threadIdx.x, blockDim.x, shared);
  if (common.block_stats == nullptr) return;
  double v[kStatColumns];
  for (int k = 0; k < kStatColumns; ++k) v[k] = sums.v[k];
  BlockSum::device(v);
  if (threadIdx.x == 0) {
    double* row = Block::stats_row(meta, common, blockIdx.x);
    for (int k = 0; k < kStatColumns; ++k) row[k] = v[k];
  }
}

// One block per group: its rows in a fixed order (group_share, then BlockSum), added to `stats`.
__global__ void __launch_bounds__(kBlockSize)
    sum_stats_kernel(const double* rows, int64_t nrows, double* stats, const float* found_inf) {
  if (skip_step(found_inf)) return;
  double v[kStatColumns] = {};
  group_share(rows, nrows, blockIdx.x, threadIdx.x, blockDim.x, v);
  BlockSum::device(v);
  if (threadIdx.x == 0)
    for (int k = 0; k < kStatColumns; ++k) stats[blockIdx.x * kStatColumns + k] += v[k];
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

  static void sum_stats(const double* rows, int64_t nrows, double* stats, int groups, const float* found_inf) {
    if (groups == 0) return;
    sum_stats_kernel<<<groups, kBlockSize, 0, at::cuda::getCurrentCUDAStream()>>>(rows, nrows, stats, found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

struct Cuda {
  template <typename Rule>
  static void run(const FusedCall& call) {
    check_call<Rule>(call);
    if (call.params.empty()) return;
    const c10::cuda::CUDAGuard guard(call.params[0].device());
    fused<CudaLauncher, Rule>(call);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(lrfuse, CUDA, m) { register_rules<Cuda>(m); }

}  // namespace lrfuse::cuda
