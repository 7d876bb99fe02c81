// CUDA kernels of the fused ops: every tensor of every group in as few launches as the kernel
// parameter space allows (one per dtype present, more only past hundreds of tensors or 64M
// elements). Learning rate and the other per-group values come from the float64 `hyper` table,
// steps from their 0-d tensors and `grad_scale` / `found_inf` from theirs, all read on the device:
// no host sync, no allocation (but see MultiTensorCall for non-dense operands), current stream,
// so a step can be captured in a CUDA graph and a changed lr is seen on replay.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../update_rules.h"
#include "multi_tensor_apply.cuh"

namespace lrfuse::cuda {
namespace {

using at::Tensor;
using at::TensorList;

// The per-element math is update_rules.h's, shared with the CPU; these kernels only load, store
// and compute the per-tensor constants once per block (thread 0, into shared memory: the double
// pow of the bias corrections is not repeated by 512 threads).

template <typename scalar_t, bool kAmsgrad>
__global__ void __launch_bounds__(kBlockSize)
    adam_kernel(TensorListMeta<4 + kAmsgrad> meta, Common common) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kDepth = 4 + kAmsgrad;
  if (skip_step(common.found_inf)) return;
  const Chunk<scalar_t, kDepth> chunk = block_chunk<scalar_t, kDepth>(meta);
  __shared__ AdamConsts<opmath_t> shared;
  if (threadIdx.x == 0) {
    const float step = *meta.step[chunk.tensor] + 1.0f;  // as torch: the step counts this update
    shared = adam_consts<opmath_t>(common.hyper + meta.group[chunk.tensor] * adam_col::count, step, kAmsgrad);
    if (meta.owns_step[chunk.tensor]) *meta.step[chunk.tensor] = step;
  }
  __syncthreads();
  const AdamConsts<opmath_t> c = shared;
  const opmath_t scale = common.grad_scale ? static_cast<opmath_t>(*common.grad_scale) : opmath_t(1);
  chunk_loop<scalar_t, opmath_t, kDepth>(chunk.ptr, chunk.n, threadIdx.x, blockDim.x, [&](opmath_t(&x)[kDepth]) {
    const opmath_t g = x[1] / scale;  // dividing by 1 is exact: no branch needed
    if constexpr (kAmsgrad) {
      adam_update(x[0], g, x[2], x[3], x[4], c);
    } else {
      opmath_t unused = 0;
      adam_update(x[0], g, x[2], x[3], unused, c);
    }
  });
}

template <typename scalar_t, bool kMomentum, bool kCentered>
__global__ void __launch_bounds__(kBlockSize)
    rmsprop_kernel(TensorListMeta<3 + kMomentum + kCentered> meta, Common common) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kDepth = 3 + kMomentum + kCentered;
  // Operand slots: param, grad, square_avg, then momentum_buffer and grad_avg when present.
  constexpr int kBuf = kMomentum ? 3 : 0, kGradAvg = kCentered ? 3 + kMomentum : 0;
  if (skip_step(common.found_inf)) return;
  const Chunk<scalar_t, kDepth> chunk = block_chunk<scalar_t, kDepth>(meta);
  __shared__ RMSpropConsts<opmath_t> shared;
  if (threadIdx.x == 0) {
    shared = rmsprop_consts<opmath_t>(common.hyper + meta.group[chunk.tensor] * rmsprop_col::count, kCentered,
                                      kMomentum);
    if (meta.owns_step[chunk.tensor]) *meta.step[chunk.tensor] += 1.0f;
  }
  __syncthreads();
  const RMSpropConsts<opmath_t> c = shared;
  const opmath_t scale = common.grad_scale ? static_cast<opmath_t>(*common.grad_scale) : opmath_t(1);
  chunk_loop<scalar_t, opmath_t, kDepth>(chunk.ptr, chunk.n, threadIdx.x, blockDim.x, [&](opmath_t(&x)[kDepth]) {
    opmath_t no_buf = 0, no_grad_avg = 0;
    rmsprop_update(x[0], x[1] / scale, x[2], kMomentum ? x[kBuf] : no_buf, kCentered ? x[kGradAvg] : no_grad_avg, c);
  });
}

template <typename Meta, typename Kernel>
void launch(Kernel kernel, const Meta& meta, int blocks, const Common& common) {
  kernel<<<blocks, kBlockSize, 0, at::cuda::getCurrentCUDAStream()>>>(meta, common);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Common common_of(const Tensor& hyper, const std::optional<Tensor>& grad_scale,
                 const std::optional<Tensor>& found_inf) {
  return {hyper.data_ptr<double>(), grad_scale ? grad_scale->data_ptr<float>() : nullptr,
          found_inf ? found_inf->data_ptr<float>() : nullptr};
}

template <bool kAmsgrad>
void adam_launches(const std::array<TensorList, 4 + kAmsgrad>& lists, TensorList steps, at::IntArrayRef group_of,
                   const Common& common) {
  constexpr int kDepth = 4 + kAmsgrad;
  MultiTensorCall<kDepth> call(lists, steps, group_of);
  for (const at::ScalarType dtype : call.dtypes()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_adam_cuda", [&] {
      call.run(dtype, [&](const TensorListMeta<kDepth>& meta, int blocks) {
        launch(adam_kernel<scalar_t, kAmsgrad>, meta, blocks, common);
      });
    });
  }
  call.finish(common.found_inf);
}

template <bool kMomentum, bool kCentered>
void rmsprop_launches(const std::array<TensorList, 3 + kMomentum + kCentered>& lists, TensorList steps,
                      at::IntArrayRef group_of, const Common& common) {
  constexpr int kDepth = 3 + kMomentum + kCentered;
  MultiTensorCall<kDepth> call(lists, steps, group_of);
  for (const at::ScalarType dtype : call.dtypes()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_rmsprop_cuda", [&] {
      call.run(dtype, [&](const TensorListMeta<kDepth>& meta, int blocks) {
        launch(rmsprop_kernel<scalar_t, kMomentum, kCentered>, meta, blocks, common);
      });
    });
  }
  call.finish(common.found_inf);
}

void fused_adam_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                     TensorList max_exp_avg_sqs, TensorList steps, at::IntArrayRef group_of, const Tensor& hyper,
                     const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  check_fused_args({"fused_adam_", params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
                    {{"max_exp_avg_sqs", max_exp_avg_sqs}}, steps, group_of, hyper, adam_col::count,
                    grad_scale, found_inf});
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Common common = common_of(hyper, grad_scale, found_inf);
  if (max_exp_avg_sqs.empty()) {
    adam_launches<false>({params, grads, exp_avgs, exp_avg_sqs}, steps, group_of, common);
  } else {
    adam_launches<true>({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, steps, group_of, common);
  }
}

void fused_rmsprop_cuda(TensorList params, TensorList grads, TensorList square_avgs, TensorList momentum_buffers,
                        TensorList grad_avgs, TensorList steps, at::IntArrayRef group_of, const Tensor& hyper,
                        const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  check_fused_args({"fused_rmsprop_", params, grads, {{"square_avgs", square_avgs}},
                    {{"momentum_buffers", momentum_buffers}, {"grad_avgs", grad_avgs}}, steps, group_of, hyper,
                    rmsprop_col::count, grad_scale, found_inf});
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Common common = common_of(hyper, grad_scale, found_inf);
  const bool momentum = !momentum_buffers.empty(), centered = !grad_avgs.empty();
  if (momentum && centered) {
    rmsprop_launches<true, true>({params, grads, square_avgs, momentum_buffers, grad_avgs}, steps, group_of, common);
  } else if (momentum) {
    rmsprop_launches<true, false>({params, grads, square_avgs, momentum_buffers}, steps, group_of, common);
  } else if (centered) {
    rmsprop_launches<false, true>({params, grads, square_avgs, grad_avgs}, steps, group_of, common);
  } else {
    rmsprop_launches<false, false>({params, grads, square_avgs}, steps, group_of, common);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lrfuse, CUDA, m) {
  m.impl("fused_adam_", &fused_adam_cuda);
  m.impl("fused_rmsprop_", &fused_rmsprop_cuda);
}

}  // namespace lrfuse::cuda
