// Why a measured CPU step costs what it does: an Adam-like update on n floats, one thread, outside
// torch, three ways: the plain loop; the sums in the update loop, as csrc/cpu/loops.h does (16
// fixed lanes, summed in float per 256-element block, then added into double lanes as vectors;
// fused multiply-adds; the non-finite count only when the squared-gradient sum is not finite;
// prefetches 4 KB ahead); and
// the design it replaced (per block, a pass that keeps the parameters and sums, the plain loop, a
// pass over the differences). Prints each as a multiple of the plain loop: the median of many runs
// taken in turn, three rounds.
//
//   g++ -O3 -fopenmp -fno-math-errno -ffp-contract=off -std=c++17 benchmarks/stats_loop_micro.cpp \
//       -o /tmp/stats_loop_micro && /tmp/stats_loop_micro 4096 && /tmp/stats_loop_micro 16777216; rm /tmp/stats_loop_micro
//
// (The flags are setup.py's; the clones are cpu_isa.h's.)
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

namespace {

struct Consts { float lerp_weight, beta2, one_minus_beta2, inv_bias_correction2_sqrt, eps, neg_step_size; };
constexpr long kBlock = 256;
constexpr int kLanes = 16;
constexpr long kAhead = 1024;

inline float lerp(float self, float end, float w) {  // rules/rule.h's: a select, not a branch
  const float small = std::fma(w, end - self, self), large = std::fma(w - 1.f, end - self, end);
  return (w < 0.5f && w > -0.5f) ? small : large;
}

inline __attribute__((always_inline)) float update(float p, float g, float* __restrict__ m, float* __restrict__ v,
                                                   long i, const Consts& c) {
  m[i] = lerp(m[i], g, c.lerp_weight);
  v[i] = std::fma(c.one_minus_beta2 * g, g, v[i] * c.beta2);
  return p + c.neg_step_size * m[i] / (std::sqrt(v[i]) * c.inv_bias_correction2_sqrt + c.eps);
}

CLONES void plain(long n, float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                  float* __restrict__ v, Consts c) {
  for (long i = 0; i < n; ++i) p[i] = update(p[i], g[i], m, v, i, c);
}

CLONES void one_loop(long n, float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                     float* __restrict__ v, Consts c, double* sums) {
  double lanes[3][kLanes] = {};
  for (long s = 0; s < n; s += kBlock) {
    const long e = std::min(n, s + kBlock);
    float u[kLanes] = {}, pp[kLanes] = {}, gg[kLanes] = {};
    const auto measured = [&](long i, int l) __attribute__((always_inline)) {
      const float before = p[i], gi = g[i], after = update(before, gi, m, v, i, c), d = after - before;
      p[i] = after;
      u[l] = std::fma(d, d, u[l]);
      pp[l] = std::fma(before, before, pp[l]);
      gg[l] = std::fma(gi, gi, gg[l]);
    };
    long i = s;
    for (; i + kLanes <= e; i += kLanes) {
      if (i + kAhead < n) {  // loops.h's kPrefetchAhead: a line of each stream, 4 KB ahead
        __builtin_prefetch(p + i + kAhead, 1), __builtin_prefetch(g + i + kAhead, 0);
        __builtin_prefetch(m + i + kAhead, 1), __builtin_prefetch(v + i + kAhead, 1);
      }
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) measured(i + l, l);
    }
    for (int l = 0; i < e; ++i, ++l) measured(i, l);
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[0][l] += u[l], lanes[1][l] += pp[l], lanes[2][l] += gg[l];
  }
  for (int k = 0; k < 3; ++k)
    for (int l = 0; l < kLanes; ++l) sums[k] += lanes[k][l];
  if (!std::isfinite(sums[2]))
    for (long i = 0; i < n; ++i) sums[3] += !std::isfinite(g[i]);
}

CLONES void keep_and_sum(long n, const float* __restrict__ p, const float* __restrict__ g, float* __restrict__ kept,
                         double* sums) {
  float pp = 0, gg = 0, nf = 0;
#pragma omp simd reduction(+ : pp, gg, nf)
  for (long i = 0; i < n; ++i) {
    kept[i] = p[i];
    pp += p[i] * p[i];
    gg += g[i] * g[i];
    nf += g[i] - g[i] != 0.f ? 1.f : 0.f;
  }
  sums[1] += pp, sums[2] += gg, sums[3] += nf;
}

CLONES void sum_differences(long n, const float* __restrict__ p, const float* __restrict__ kept, double* sums) {
  float u = 0;
#pragma omp simd reduction(+ : u)
  for (long i = 0; i < n; ++i) u += (p[i] - kept[i]) * (p[i] - kept[i]);
  sums[0] += u;
}

void three_loops(long n, float* p, const float* g, float* m, float* v, Consts c, double* sums) {
  alignas(64) float kept[kBlock];
  for (long s = 0; s < n; s += kBlock) {
    const long k = std::min(kBlock, n - s);
    keep_and_sum(k, p + s, g + s, kept, sums);
    plain(k, p + s, g + s, m + s, v + s, c);
    sum_differences(k, p + s, kept, sums);
  }
}

// Median milliseconds of each of `fs`, run in turn `reps` times: on a shared machine, runs of
// one variant after another drift apart by more than the variants differ.
template <size_t K>
std::array<double, K> interleaved_ms(int reps, const std::array<std::function<void()>, K>& fs) {
  std::array<std::vector<double>, K> t;
  for (int r = 0; r < reps; ++r)
    for (size_t j = 0; j < K; ++j) {
      const size_t v = (j + r) % K;  // a different one first each time
      const auto start = std::chrono::steady_clock::now();
      fs[v]();
      t[v].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
  std::array<double, K> median;
  for (size_t j = 0; j < K; ++j) {
    std::sort(t[j].begin(), t[j].end());
    median[j] = t[j][t[j].size() / 2];
  }
  return median;
}

}  // namespace

int main(int argc, char** argv) {
  const long n = argc > 1 ? std::atol(argv[1]) : 1 << 20;
  const int reps = static_cast<int>(std::clamp(2e8 / double(n), 15.0, 3000.0));
  std::vector<float> p(n), g(n), m(n, 0.f), v(n, 0.f);
  for (long i = 0; i < n; ++i) p[i] = 0.5f + 1e-3f * (i % 100), g[i] = 0.1f - 1e-3f * (i % 37);
  const Consts c{0.1f, 0.999f, 0.001f, 1.2f, 1e-8f, -1e-3f};
  double sums[4] = {};
  for (int round = 0; round < 3; ++round) {
    const auto ms = interleaved_ms<3>(reps, {[&] { plain(n, p.data(), g.data(), m.data(), v.data(), c); },
                                             [&] { one_loop(n, p.data(), g.data(), m.data(), v.data(), c, sums); },
                                             [&] { three_loops(n, p.data(), g.data(), m.data(), v.data(), c, sums); }});
    std::printf("n=%ld plain %.3f ms; measured: one loop %.3fx, three loops %.3fx\n", n, ms[0], ms[1] / ms[0],
                ms[2] / ms[0]);
  }
  return sums[0] < 0;  // keeps the sums live
}
