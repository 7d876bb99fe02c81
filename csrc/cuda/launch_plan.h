// Who updates what in a CUDA call: how its tensors are packed into launches (the kernel's
// parameter struct and the packing), which elements each block updates, and how a block's
// threads walk them.
//
// The host packs, per launch, the tensors' addresses, sizes, group rows and step pointers into
// the kernel's parameter struct (no device buffer to fill, so nothing to allocate or copy in the
// step, and a captured CUDA graph keeps the struct by value). Each block handles one chunk of
// one tensor. CUDA 12.1+ on Volta+ accepts 32 KB of kernel parameters, so a launch carries
// hundreds of tensors instead of the ~36 that the old 4 KB limit allowed.
//
// Plain C++ without CUDA headers: the CPU tests compile this file and check that every element
// of every tensor falls in exactly one block, across launch boundaries and past 2^31 elements,
// and that a block's threads update each of its elements once (tests/test_launch_plan.py).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../host_device.h"

namespace lrfuse::cuda {

constexpr int kBlockSize = 512;  // threads
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
  double* block_stats;      // null: not measured; else this launch's first row of kernels.h's BlockStats
};

template <int kDepth>
struct TensorListMeta {
  static constexpr int kMaxBlocks = 1024;
  static constexpr int kMaxTensors =
      (kParamBudget - sizeof(Common) - kMaxBlocks * (sizeof(uint16_t) + sizeof(int32_t))) /
      (kDepth * sizeof(void*) + sizeof(int64_t) + sizeof(float*) + sizeof(int32_t));
  static_assert(kMaxTensors < 65536, "block_tensor is 16-bit");

  void* addresses[kDepth][kMaxTensors];  // [0] param, [1] grad, then state in the op's order
  int64_t numel[kMaxTensors];
  float* step[kMaxTensors];
  int32_t group[kMaxTensors];
  uint16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

// The steps that the blocks do not advance themselves, for one small launch after the updates.
struct StepList {
  static constexpr int kMax = (kParamBudget - sizeof(const float*) - sizeof(int)) / sizeof(float*);
  float* step[kMax];
  int count;
};

static_assert(sizeof(StepList) + sizeof(const float*) <= kParamBudget + 64, "kernel parameters too large");

// One tensor as the packing sees it: its operands' addresses and what the kernel reads of it.
template <int kDepth>
struct TensorSlot {
  void* addresses[kDepth];
  int64_t numel;
  float* step;
  int32_t group;
};

// A tensor of one chunk has one block, which advances its step itself; the steps of the others
// (several chunks, read by blocks in no order, or none) are advanced after the last launch.
LRFUSE_HD bool block_owns_step(int64_t numel) { return numel > 0 && numel <= kChunkSize; }

// The elements [offset, offset + n) of slot `tensor` that block `block` updates (64-bit offset).
struct Extent {
  int tensor;
  int64_t offset;
  int n;
};

template <int kDepth>
LRFUSE_HD Extent block_extent(const TensorListMeta<kDepth>& meta, int block) {
  Extent e;
  e.tensor = meta.block_tensor[block];
  e.offset = static_cast<int64_t>(meta.block_chunk[block]) * kChunkSize;
  const int64_t left = meta.numel[e.tensor] - e.offset;
  e.n = static_cast<int>(left < kChunkSize ? left : kChunkSize);
  return e;
}

// Fills launches one tensor at a time and hands each full one to `launch(meta, blocks)`. A
// tensor whose chunks do not fit goes on in the next launch, as its first slot.
template <int kDepth>
class LaunchPacker {
 public:
  using Meta = TensorListMeta<kDepth>;

  // Adds the chunks of `t`.
  template <typename Launch>
  void add(const TensorSlot<kDepth>& t, const Launch& launch) {
    const int64_t chunks = (t.numel + kChunkSize - 1) / kChunkSize;
    if (chunks == 0) return;
    set_slot(nt_, t);
    for (int64_t c = 0; c < chunks; ++c) {
      meta_.block_tensor[nb_] = static_cast<uint16_t>(nt_);
      meta_.block_chunk[nb_] = static_cast<int32_t>(c);
      ++nb_;
      const bool last_chunk = c == chunks - 1;
      if (nb_ == Meta::kMaxBlocks || (last_chunk && nt_ + 1 == Meta::kMaxTensors)) {
        launch(meta_, nb_);  // the kernel takes the struct by value: it may be refilled now
        nb_ = 0;
        if (last_chunk) {
          nt_ = 0;
          return;
        }
        set_slot(0, t);
        nt_ = 0;
      }
    }
    ++nt_;
  }

  // Launches what is left.
  template <typename Launch>
  void flush(const Launch& launch) {
    if (nb_ > 0) launch(meta_, nb_);
    nb_ = nt_ = 0;
  }

 private:
  void set_slot(int slot, const TensorSlot<kDepth>& t) {
    for (int k = 0; k < kDepth; ++k) meta_.addresses[k][slot] = t.addresses[k];
    meta_.numel[slot] = t.numel;
    meta_.step[slot] = t.step;
    meta_.group[slot] = t.group;
  }

  Meta meta_{};  // filled slots only are read; zeroed so no uninitialised bytes are sent
  int nt_ = 0, nb_ = 0;
};

template <typename T, int N>
struct alignas(16) Vec {
  T val[N];
};

// Thread `thread` of `threads` runs `op(x)` on its share of the `n` elements at `ptr`: `x[k]` is
// operand k in `opmath_t`; every operand but the gradient (k = 1) is stored back. 16-byte vector
// loads when every operand is aligned, element loads otherwise and for the tail.
template <typename scalar_t, typename opmath_t, int kDepth, typename Op>
LRFUSE_HD void chunk_loop(scalar_t* const (&ptr)[kDepth], int n, int thread, int threads, const Op& op) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  bool aligned = true;
  LRFUSE_UNROLL
  for (int k = 0; k < kDepth; ++k) aligned = aligned && reinterpret_cast<uintptr_t>(ptr[k]) % 16 == 0;
  int start = 0;
  if (aligned) {
    using V = Vec<scalar_t, kVec>;
    const int nvec = n / kVec;
    for (int v = thread; v < nvec; v += threads) {
      V r[kDepth];
      LRFUSE_UNROLL
      for (int k = 0; k < kDepth; ++k) r[k] = reinterpret_cast<const V*>(ptr[k])[v];
      LRFUSE_UNROLL
      for (int j = 0; j < kVec; ++j) {
        opmath_t x[kDepth];
        LRFUSE_UNROLL
        for (int k = 0; k < kDepth; ++k) x[k] = static_cast<opmath_t>(r[k].val[j]);
        op(x);
        LRFUSE_UNROLL
        for (int k = 0; k < kDepth; ++k)
          if (k != 1) r[k].val[j] = static_cast<scalar_t>(x[k]);
      }
      LRFUSE_UNROLL
      for (int k = 0; k < kDepth; ++k)
        if (k != 1) reinterpret_cast<V*>(ptr[k])[v] = r[k];
    }
    start = nvec * kVec;
  }
  for (int i = start + thread; i < n; i += threads) {
    opmath_t x[kDepth];
    LRFUSE_UNROLL
    for (int k = 0; k < kDepth; ++k) x[k] = static_cast<opmath_t>(ptr[k][i]);
    op(x);
    LRFUSE_UNROLL
    for (int k = 0; k < kDepth; ++k)
      if (k != 1) ptr[k][i] = static_cast<scalar_t>(x[k]);
  }
}

}  // namespace lrfuse::cuda
