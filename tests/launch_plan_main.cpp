// Runs csrc/cuda/launch_plan.h on the host; tests/test_launch_plan.py compiles this and checks
// what it prints.
//
// `launch_plan_main plan DEPTH < element counts` packs tensors (one count each) into launches
// and prints what every block of every launch would update. Tensor i gets operand k at the fake
// address (i + 1) * 16 + k and group i % 7. Output lines:
//   limits MAX_TENSORS MAX_BLOCKS
//   launch BLOCKS
//   block TENSOR OFFSET N NUMEL GROUP OWNS_STEP ADDRESSES_OK   (one per block of that launch)
//   late TENSOR                                                (steps the caller advances)
//
// `launch_plan_main threads` runs `chunk_loop` for every thread of a block, one after the other
// (its threads share nothing), on real arrays: aligned, misaligned, mixed, with tails. It prints
// each wrong element and then `checked CASES`.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/launch_plan.h"

using namespace lrfuse::cuda;

template <int kDepth>
int print_plan() {
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
                  meta.group[e.tensor], block_owns_step(meta.numel[e.tensor]), ok);
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
    packer.add(t, launch);
    if (!block_owns_step(t.numel)) std::printf("late %lld\n", static_cast<long long>(i));
  }
  packer.flush(launch);
  return 0;
}

// One chunk_loop case: operand k starts `shift[k]` elements past an aligned address. Every
// element must be visited once: the parameter gains 1, the other stored operands become the
// gradient times k, the gradient (which the op overwrites) and the guard elements stay.
template <typename T, int kDepth>
int check_threads(int n, const int (&shift)[kDepth], int threads) {
  constexpr int kGuard = 8;
  std::vector<std::vector<T>> storage(kDepth, std::vector<T>(n + 2 * kGuard + 16 / sizeof(T)));
  T* ptr[kDepth];
  for (int k = 0; k < kDepth; ++k) {
    auto address = reinterpret_cast<uintptr_t>(storage[k].data()) + kGuard * sizeof(T);
    address = (address + 15) / 16 * 16 + shift[k] * sizeof(T);
    ptr[k] = reinterpret_cast<T*>(address);
    for (int i = -kGuard; i < n + kGuard; ++i) ptr[k][i] = k == 0 ? T(i) : k == 1 ? T(1000 + i) : T(-1);
  }
  for (int t = 0; t < threads; ++t) {
    chunk_loop<T, double, kDepth>(ptr, n, t, threads, [](double(&x)[kDepth]) {
      x[0] += 1;
      for (int k = 2; k < kDepth; ++k) x[k] = x[1] * k;
      x[1] = -999;  // the gradient is read only: this must not be stored
    });
  }
  int wrong = 0;
  for (int k = 0; k < kDepth; ++k) {
    for (int i = -kGuard; i < n + kGuard; ++i) {
      const bool inside = i >= 0 && i < n;
      const T want = k == 0 ? T(i + inside) : k == 1 ? T(1000 + i) : inside ? T((1000 + i) * k) : T(-1);
      if (ptr[k][i] != want && wrong++ < 5)
        std::printf("wrong n=%d threads=%d shift=%d operand %d element %d: %g, want %g\n", n, threads, shift[k], k,
                    i, double(ptr[k][i]), double(want));
    }
  }
  return wrong;
}

template <typename T>
int check_threads_all(int& cases) {
  int wrong = 0;
  const int shifts[][4] = {{0, 0, 0, 0}, {1, 1, 1, 1}, {0, 0, 1, 0}, {0, 1, 0, 0}};
  for (int n : {0, 1, 3, 4, 5, 17, 4096, 4097, 65535, 65536})
    for (const auto& shift : shifts)
      for (int threads : {512, 3}) {
        wrong += check_threads<T, 4>(n, shift, threads);
        ++cases;
      }
  return wrong;
}

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "threads") == 0) {
    int cases = 0;
    const int wrong = check_threads_all<float>(cases) + check_threads_all<double>(cases);
    std::printf("checked %d\n", cases);
    return wrong != 0;
  }
  const int depth = argc == 3 && std::strcmp(argv[1], "plan") == 0 ? std::atoi(argv[2]) : 0;
  switch (depth) {
    case 3: return print_plan<3>();
    case 4: return print_plan<4>();
    case 5: return print_plan<5>();
    default: std::fprintf(stderr, "usage: %s plan DEPTH(3..5) < element counts | %s threads\n", argv[0], argv[0]);
             return 2;
  }
}
