// How one CPU call walks its tensors: the work list of a fused step.
//
// Every tensor of the call owns a range of one flat element space; at::parallel_for splits that
// space evenly among threads in a single parallel region, so one 16M-element tensor and two
// thousand 4K-element tensors balance alike, whatever their groups.
//
// A tensor whose operands (parameter, gradient, state) share one dense layout is walked as a
// flat array: the vectorized loop. Otherwise (a transposed weight with a contiguous gradient, a
// sliced parameter) it is walked in rows of its coalesced dims, each operand with its own
// strides, in the parameter's memory order: correct for any strides, with no copies.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/COW.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../fused_op.h"

namespace lrfuse::cpu {

constexpr int kMaxOperands = 2 + kMaxStates;  // parameter, gradient, the states

// Below this many elements per thread, a parallel region costs more than it saves.
constexpr int64_t kGrainSize = 32768;

struct Walk {
  std::array<char*, kMaxOperands> data{};
  int64_t numel = 0;
  int num_operands = 0;
  // Strided walk only: coalesced dims, outermost first; strides[d][k] in elements of operand k.
  std::vector<int64_t> sizes;
  std::vector<std::array<int64_t, kMaxOperands>> strides;
  bool flat() const { return sizes.empty(); }
};

class Plan {
 public:
  explicit Plan(size_t num_tensors) : walks_(num_tensors) {}

  // Tensor i's walk; operands[0] is the parameter, a null operand is absent (that feature is off).
  // Calls for distinct i may run in parallel unless copy_on_write(operands): the first write
  // pointer of a lazily cloned storage materializes its copy, which must not race with another
  // view of that storage.
  void set(size_t i, const std::array<const at::Tensor*, kMaxOperands>& operands) {
    Walk& w = walks_[i];
    w.numel = operands[0]->numel();
    for (int k = 0; k < kMaxOperands; ++k) {
      if (operands[k] == nullptr) continue;
      w.data[k] = static_cast<char*>(operands[k]->data_ptr());
      w.num_operands = k + 1;
    }
    if (!shares_dense_layout(operands)) coalesce(operands, w);
  }

  static bool copy_on_write(const std::array<const at::Tensor*, kMaxOperands>& operands) {
    for (const at::Tensor* t : operands)
      if (t && t->has_storage() && c10::impl::cow::is_cow_data_ptr(t->storage().data_ptr())) return true;
    return false;
  }

  // After every set(): the flat element space.
  void finish() {
    offsets_.resize(walks_.size() + 1);
    offsets_[0] = 0;
    for (size_t i = 0; i < walks_.size(); ++i) offsets_[i + 1] = offsets_[i] + walks_[i].numel;
  }

  const Walk& walk(size_t i) const { return walks_[i]; }

  // visit(i, lo, hi): elements [lo, hi) of tensor i, from one thread.
  template <typename Visit>
  void run(const Visit& visit) const {
    at::parallel_for(0, offsets_.back(), kGrainSize, [&](int64_t begin, int64_t end) {
      size_t i = tensor_at(begin);
      for (; begin < end; ++i) {
        const int64_t stop = std::min(end, offsets_[i + 1]);
        if (stop > begin) visit(i, begin - offsets_[i], stop - offsets_[i]);
        begin = stop;
      }
    });
  }

  // Each tensor cut into tiles of `tile` elements: the first tile of each tensor, then the total.
  std::vector<int64_t> tiles(int64_t tile) const {
    std::vector<int64_t> first(walks_.size() + 1, 0);
    for (size_t i = 0; i < walks_.size(); ++i) first[i + 1] = first[i] + (walks_[i].numel + tile - 1) / tile;
    return first;
  }

  // visit(i, lo, hi, t): tile t, elements [lo, hi) of tensor i, from one thread. Tiles start at
  // fixed multiples of `tile` in each tensor, so what is summed per tile does not depend on the
  // number of threads. The threads split the element space as run() does, each taking the tiles
  // whose middle element is in its share: by elements, not by tiles, since a small tensor is a
  // whole tile, and by the middle, not the start, so a share is off by at most half a tile
  // (taken by its start, `tiny`'s first thread of two ran 11% more than run() gives it).
  template <typename Visit>
  void run_tiles(const std::vector<int64_t>& first, int64_t tile, const Visit& visit) const {
    at::parallel_for(0, offsets_.back(), kGrainSize, [&](int64_t begin, int64_t end) {
      for (size_t i = tensor_at(begin); i < walks_.size() && offsets_[i] < end; ++i) {
        const int64_t numel = walks_[i].numel;
        for (int64_t k = std::max<int64_t>(0, (begin - offsets_[i]) / tile - 1); k * tile < numel; ++k) {
          const int64_t lo = k * tile, hi = std::min(numel, lo + tile), middle = offsets_[i] + (lo + hi) / 2;
          if (middle >= end) break;
          if (middle >= begin) visit(i, lo, hi, first[i] + k);
        }
      }
    });
  }

  // body<kContiguous>(n, ptrs, element_strides): runs of elements [lo, hi) of one tensor.
  template <typename scalar_t, typename Body>
  static void for_each_run(const Walk& w, int64_t lo, int64_t hi, const Body& body) {
    std::array<scalar_t*, kMaxOperands> ptrs{};
    if (w.flat()) {
      for (int k = 0; k < w.num_operands; ++k)
        if (w.data[k]) ptrs[k] = reinterpret_cast<scalar_t*>(w.data[k]) + lo;
      body(std::true_type{}, hi - lo, ptrs, nullptr);
      return;
    }
    const int nd = static_cast<int>(w.sizes.size());
    std::vector<int64_t> index(nd);
    for (int64_t rem = lo, d = nd - 1; d >= 0; --d) {
      index[d] = rem % w.sizes[d];
      rem /= w.sizes[d];
    }
    const int64_t inner = w.sizes[nd - 1];
    const auto& inner_strides = w.strides[nd - 1];
    for (int64_t pos = lo; pos < hi;) {
      const int64_t n = std::min(inner - index[nd - 1], hi - pos);
      for (int k = 0; k < w.num_operands; ++k) {
        if (!w.data[k]) continue;
        int64_t offset = 0;
        for (int d = 0; d < nd; ++d) offset += index[d] * w.strides[d][k];
        ptrs[k] = reinterpret_cast<scalar_t*>(w.data[k]) + offset;
      }
      body(std::false_type{}, n, ptrs, inner_strides.data());
      pos += n;
      index[nd - 1] += n;
      for (int d = nd - 1; d > 0 && index[d] == w.sizes[d]; --d) {
        index[d] = 0;
        ++index[d - 1];
      }
    }
  }

 private:
  // The tensor that holds element `element` of the flat space (after finish()).
  size_t tensor_at(int64_t element) const {
    return std::upper_bound(offsets_.begin(), offsets_.end(), element) - offsets_.begin() - 1;
  }

  static bool shares_dense_layout(const std::array<const at::Tensor*, kMaxOperands>& ops) {
    if (!ops[0]->is_non_overlapping_and_dense()) return false;
    for (int k = 1; k < kMaxOperands; ++k)
      if (ops[k] && !same_layout(*ops[0], *ops[k])) return false;
    return true;
  }

  static void coalesce(const std::array<const at::Tensor*, kMaxOperands>& ops, Walk& w) {
    const at::Tensor& p = *ops[0];
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < p.dim(); ++d)
      if (p.size(d) > 1) dims.push_back(d);
    // The parameter's memory order, outermost first: its writes stay sequential.
    std::stable_sort(dims.begin(), dims.end(),
                     [&](int64_t x, int64_t y) { return p.stride(x) > p.stride(y); });
    for (int64_t d : dims) {
      std::array<int64_t, kMaxOperands> s{};
      for (int k = 0; k < w.num_operands; ++k) s[k] = ops[k] ? ops[k]->stride(d) : 0;
      const int64_t size = p.size(d);
      if (!w.sizes.empty()) {
        // Fold the previous (outer) dim into this one where every operand allows it.
        bool mergeable = true;
        for (int k = 0; k < w.num_operands; ++k)
          mergeable = mergeable && w.strides.back()[k] == s[k] * size;
        if (mergeable) {
          w.sizes.back() *= size;
          w.strides.back() = s;
          continue;
        }
      }
      w.sizes.push_back(size);
      w.strides.push_back(s);
    }
    // No dim left means at most one element: the flat walk serves.
  }

  std::vector<Walk> walks_;
  std::vector<int64_t> offsets_;
};

}  // namespace lrfuse::cpu
