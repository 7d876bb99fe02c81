// Runs the CUDA launch packing (csrc/cuda/launch_plan.h) on the host and prints what every block
// of every launch would update; tests/test_launch_plan.py compiles this and checks the output.
//
// Usage: launch_plan_main DEPTH < element counts, one per tensor. Tensor i gets operand k at the
// fake address (i + 1) * 16 + k and group i % 7. Output lines:
//   limits MAX_TENSORS MAX_BLOCKS
//   launch BLOCKS
//   block TENSOR OFFSET N NUMEL GROUP OWNS_STEP ADDRESSES_OK   (one per block of that launch)
//   late TENSOR                                                (steps the caller advances)
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/launch_plan.h"

using namespace lrfuse::cuda;

template <int kDepth>
int run() {
  using Meta = TensorListMeta<kDepth>;
  std::printf("limits %d %d\n", Meta::kMaxTensors, Meta::kMaxBlocks);
  auto launch = [](const Meta& meta, int blocks) {
    std::printf("launch %d\n", blocks);
    for (int b = 0; b < blocks; ++b) {
      const Extent e = block_extent(meta, b);
      const auto first = reinterpret_cast<uintptr_t>(meta.addresses[0][e.tensor]);
      bool ok = first % 16 == 0 && reinterpret_cast<uintptr_t>(meta.step[e.tensor]) == first;
      for (int k = 1; k < kDepth; ++k) ok = ok && reinterpret_cast<uintptr_t>(meta.addresses[k][e.tensor]) == first + k;
      std::printf("block %lld %lld %d %lld %d %d %d\n", static_cast<long long>(first / 16 - 1),
                  static_cast<long long>(e.offset), e.n, static_cast<long long>(meta.numel[e.tensor]),
                  meta.group[e.tensor], meta.owns_step[e.tensor], ok);
    }
  };
  LaunchPacker<kDepth> packer;
  long long numel;
  for (int64_t i = 0; std::scanf("%lld", &numel) == 1; ++i) {
    TensorSlot<kDepth> t;
    const uintptr_t base = static_cast<uintptr_t>(i + 1) * 16;
    for (int k = 0; k < kDepth; ++k) t.addresses[k] = reinterpret_cast<void*>(base + k);
    t.numel = numel;
    t.step = reinterpret_cast<float*>(base);
    t.group = static_cast<int32_t>(i % 7);
    if (!packer.add(t, launch)) std::printf("late %lld\n", static_cast<long long>(i));
  }
  packer.flush(launch);
  return 0;
}

int main(int argc, char** argv) {
  const int depth = argc > 1 ? std::atoi(argv[1]) : 0;
  switch (depth) {
    case 3: return run<3>();
    case 4: return run<4>();
    case 5: return run<5>();
    default: std::fprintf(stderr, "usage: %s DEPTH(3..5) < element counts\n", argv[0]); return 2;
  }
}
