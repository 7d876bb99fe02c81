// Multi-tensor apply: one launch updates chunks of many tensors (of any parameter group).
//
// The host packs, per launch, the tensors' addresses, sizes, group rows and step pointers into
// the kernel's parameter struct (no device buffer to fill, so nothing to allocate or copy in the
// step, and a captured CUDA graph keeps the struct by value). Each block handles one chunk of
// one tensor; `block_tensor` / `block_chunk` say which. CUDA 12.1+ on Volta+ accepts 32 KB of
// kernel parameters, so a launch carries hundreds of tensors instead of the ~36 that the old
// 4 KB limit allowed: two thousand small tensors take a handful of launches.
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

namespace lrfuse::cuda {

constexpr int kBlockSize = 512;
// Elements per block; a multiple of every vector width, so every chunk of an aligned tensor
// starts aligned.
constexpr int64_t kChunkSize = 65536;
// Kernel parameter space (32764 bytes since CUDA 12.1), less a margin for the other arguments.
constexpr size_t kParamBudget = 32000;

// Pointers every block of a call reads on the device: no value of them crosses to the host.
struct Common {
  const double* hyper;      // (groups, columns) float64
  const float* grad_scale;  // null: gradients are not scaled
  const float* found_inf;   // null or 0: apply the step; otherwise skip everything
};

template <int kDepth>
struct TensorListMeta {
  static constexpr int kMaxBlocks = 1024;
  static constexpr int kMaxTensors =
      (kParamBudget - sizeof(Common) - kMaxBlocks * (sizeof(uint16_t) + sizeof(int32_t))) /
      (kDepth * sizeof(void*) + sizeof(int64_t) + sizeof(float*) + sizeof(int32_t) + sizeof(uint8_t) + 3);
  static_assert(kMaxTensors < 65536, "block_tensor is 16-bit");

  void* addresses[kDepth][kMaxTensors];  // [0] param, [1] grad, then state in the op's order
  int64_t numel[kMaxTensors];
  float* step[kMaxTensors];
  int32_t group[kMaxTensors];
  uint8_t owns_step[kMaxTensors];  // one chunk: its block writes step + 1
  uint16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

struct StepList {
  static constexpr int kMax = (kParamBudget - sizeof(const float*) - sizeof(int)) / sizeof(float*);
  float* step[kMax];
  int count;
};

static_assert(sizeof(TensorListMeta<5>) + sizeof(Common) <= kParamBudget + 64, "kernel parameters too large");
static_assert(sizeof(StepList) + sizeof(const float*) <= kParamBudget + 64, "kernel parameters too large");

inline __device__ bool skip_step(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

__global__ void increment_steps(StepList list, const float* found_inf) {
  if (skip_step(found_inf)) return;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < list.count; i += gridDim.x * blockDim.x)
    *list.step[i] += 1.0f;
}

template <typename T, int N>
struct alignas(16) Vec {
  T val[N];
};

// Runs `op(x)` on every element of one chunk: `x[k]` is operand k in the math type; every operand
// but the gradient (k = 1) is stored back. 16-byte vector loads when every operand is aligned,
// element loads otherwise and for the tail.
template <typename scalar_t, int kDepth, typename Op>
__device__ __forceinline__ void chunk_loop(scalar_t* const (&ptr)[kDepth], int n, const Op& op) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  bool aligned = true;
#pragma unroll
  for (int k = 0; k < kDepth; ++k) aligned = aligned && reinterpret_cast<uintptr_t>(ptr[k]) % 16 == 0;
  int start = 0;
  if (aligned) {
    using V = Vec<scalar_t, kVec>;
    const int nvec = n / kVec;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      V r[kDepth];
#pragma unroll
      for (int k = 0; k < kDepth; ++k) r[k] = reinterpret_cast<const V*>(ptr[k])[v];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        opmath_t x[kDepth];
#pragma unroll
        for (int k = 0; k < kDepth; ++k) x[k] = static_cast<opmath_t>(r[k].val[j]);
        op(x);
#pragma unroll
        for (int k = 0; k < kDepth; ++k)
          if (k != 1) r[k].val[j] = static_cast<scalar_t>(x[k]);
      }
#pragma unroll
      for (int k = 0; k < kDepth; ++k)
        if (k != 1) reinterpret_cast<V*>(ptr[k])[v] = r[k];
    }
    start = nvec * kVec;
  }
  for (int i = start + threadIdx.x; i < n; i += blockDim.x) {
    opmath_t x[kDepth];
#pragma unroll
    for (int k = 0; k < kDepth; ++k) x[k] = static_cast<opmath_t>(ptr[k][i]);
    op(x);
#pragma unroll
    for (int k = 0; k < kDepth; ++k)
      if (k != 1) ptr[k][i] = static_cast<scalar_t>(x[k]);
  }
}

// This block's chunk: operand pointers at its first element and its length (64-bit offsets).
template <typename scalar_t, int kDepth>
struct Chunk {
  scalar_t* ptr[kDepth];
  int n;
  int tensor;
};

template <typename scalar_t, int kDepth>
__device__ __forceinline__ Chunk<scalar_t, kDepth> block_chunk(const TensorListMeta<kDepth>& meta) {
  Chunk<scalar_t, kDepth> c;
  c.tensor = meta.block_tensor[blockIdx.x];
  const int64_t base = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunkSize;
  const int64_t left = meta.numel[c.tensor] - base;
  c.n = static_cast<int>(left < kChunkSize ? left : kChunkSize);
#pragma unroll
  for (int k = 0; k < kDepth; ++k) c.ptr[k] = static_cast<scalar_t*>(meta.addresses[k][c.tensor]) + base;
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
      e.step = steps[i].data_ptr<float>();
      e.group = static_cast<int32_t>(group_of[i]);
      entries_.push_back(std::move(e));
    }
  }

  // Launches the kernels for the tensors of `dtype`; `launch(meta, blocks)` launches one.
  template <typename Launch>
  void run(at::ScalarType dtype, const Launch& launch) {
    using Meta = TensorListMeta<kDepth>;
    Meta meta{};  // filled slots only are read; zeroed so no uninitialised bytes are sent
    int nt = 0, nb = 0;
    for (const Entry& e : entries_) {
      const at::Tensor& p = e.operands[0];
      if (p.scalar_type() != dtype) continue;
      const int64_t numel = p.numel();
      const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
      if (chunks != 1) late_steps_.push_back(e.step);
      if (chunks == 0) continue;
      for (int k = 0; k < kDepth; ++k) meta.addresses[k][nt] = e.operands[k].data_ptr();
      meta.numel[nt] = numel;
      meta.step[nt] = e.step;
      meta.group[nt] = e.group;
      meta.owns_step[nt] = chunks == 1;
      for (int64_t c = 0; c < chunks; ++c) {
        meta.block_tensor[nb] = static_cast<uint16_t>(nt);
        meta.block_chunk[nb] = static_cast<int32_t>(c);
        ++nb;
        const bool last_chunk = c == chunks - 1;
        if (nb == Meta::kMaxBlocks || (last_chunk && nt + 1 == Meta::kMaxTensors)) {
          launch(meta, nb);
          nb = 0;
          if (last_chunk) {
            nt = -1;
          } else {  // the tensor goes on in the next launch, as its first slot
            for (int k = 0; k < kDepth; ++k) meta.addresses[k][0] = meta.addresses[k][nt];
            meta.numel[0] = meta.numel[nt];
            meta.step[0] = meta.step[nt];
            meta.group[0] = meta.group[nt];
            meta.owns_step[0] = 0;
            nt = 0;
          }
        }
      }
      ++nt;
    }
    if (nb > 0) launch(meta, nb);
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
    std::array<at::Tensor, kDepth> operands;
    float* step;
    int32_t group;
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
