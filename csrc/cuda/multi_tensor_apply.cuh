// Multi-tensor apply: one launch updates chunks of many tensors (of any parameter group); how
// they are packed into launches is launch_plan.h's.
//
// Steps: a tensor that fits in one chunk is owned by one block, which reads the step and writes
// step + 1 itself. A tensor of several chunks is read by several blocks, maybe across launches,
// in no order; they all compute with step + 1 and one small launch after the last update writes
// the new steps (as does a zero-size tensor, whose step still advances as torch's does).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "launch_plan.h"

namespace lrfuse::cuda {

constexpr int kBlockSize = 512;

inline __device__ bool skip_step(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

__global__ void increment_steps(StepList list, const float* found_inf) {
  if (skip_step(found_inf)) return;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < list.count; i += gridDim.x * blockDim.x)
    *list.step[i] += 1.0f;
}

// This block's chunk: operand pointers at its first element, its length and its tensor's slot.
template <typename scalar_t, int kDepth>
struct Chunk {
  scalar_t* ptr[kDepth];
  int n;
  int tensor;
};

template <typename scalar_t, int kDepth>
__device__ __forceinline__ Chunk<scalar_t, kDepth> block_chunk(const TensorListMeta<kDepth>& meta) {
  const Extent e = block_extent(meta, blockIdx.x);
  Chunk<scalar_t, kDepth> c;
  c.tensor = e.tensor;
  c.n = e.n;
#pragma unroll
  for (int k = 0; k < kDepth; ++k) c.ptr[k] = static_cast<scalar_t*>(meta.addresses[k][e.tensor]) + e.offset;
  return c;
}

// The tensors of one call and how they are launched. Operands whose layout the flat loop cannot
// walk (not dense, or strides unlike the parameter's: a transposed weight with a contiguous
// gradient, a sliced parameter) run on contiguous temporaries that `finish` copies back after
// the launches. That costs an allocation and two copies for those tensors only; it is rare, and
// the CPU kernel walks strides instead. Every other tensor is updated in place in the fused launch.
template <int kDepth>
class MultiTensorCall {
 public:
  // lists[0] params, lists[1] grads, then the state lists present (each one per parameter).
  MultiTensorCall(const std::array<at::TensorList, kDepth>& lists, at::TensorList steps, at::IntArrayRef group_of) {
    const size_t n = lists[0].size();
    entries_.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      Entry e;
      const at::Tensor& p = lists[0][i];
      bool flat = p.is_non_overlapping_and_dense();
      for (int k = 1; k < kDepth && flat; ++k) flat = same_layout(p, lists[k][i]);
      for (int k = 0; k < kDepth; ++k) {
        e.operands[k] = flat ? lists[k][i] : lists[k][i].contiguous();
        if (!flat && k != 1 && !e.operands[k].is_same(lists[k][i])) copy_back_.push_back({lists[k][i], e.operands[k]});
      }
      for (int k = 0; k < kDepth; ++k) e.slot.addresses[k] = e.operands[k].data_ptr();
      e.slot.numel = p.numel();
      e.slot.step = steps[i].data_ptr<float>();
      e.slot.group = static_cast<int32_t>(group_of[i]);
      entries_.push_back(std::move(e));
    }
  }

  // Launches the kernels for the tensors of `dtype`; `launch(meta, blocks)` launches one.
  template <typename Launch>
  void run(at::ScalarType dtype, const Launch& launch) {
    LaunchPacker<kDepth> packer;
    for (const Entry& e : entries_)
      if (e.operands[0].scalar_type() == dtype && !packer.add(e.slot, launch)) late_steps_.push_back(e.slot.step);
    packer.flush(launch);
  }

  // After every `run`: the steps of multi-chunk and empty tensors, then the temporaries' copy-back.
  void finish(const float* found_inf) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    StepList list;
    list.count = 0;
    for (size_t i = 0; i < late_steps_.size(); ++i) {
      list.step[list.count++] = late_steps_[i];
      if (list.count == StepList::kMax || i + 1 == late_steps_.size()) {
        increment_steps<<<(list.count + 255) / 256, 256, 0, stream>>>(list, found_inf);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        list.count = 0;
      }
    }
    for (auto& [original, temporary] : copy_back_) original.copy_(temporary);
  }

  std::vector<at::ScalarType> dtypes() const {
    std::vector<at::ScalarType> out;
    for (const Entry& e : entries_) {
      const at::ScalarType t = e.operands[0].scalar_type();
      if (std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
    }
    return out;
  }

 private:
  struct Entry {
    std::array<at::Tensor, kDepth> operands;  // keeps contiguous temporaries alive
    TensorSlot<kDepth> slot;
  };

  static bool same_layout(const at::Tensor& a, const at::Tensor& b) {
    for (int64_t d = 0; d < a.dim(); ++d)
      if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
    return true;
  }

  std::vector<Entry> entries_;
  std::vector<float*> late_steps_;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back_;
};

}  // namespace lrfuse::cuda
