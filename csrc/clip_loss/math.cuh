// Device math shared by the contrastive-loss kernels, in the forms reference.py specifies.
#pragma once

#include <cmath>

namespace vlfast::clip_loss {

constexpr float kNegInf = -INFINITY;

// log(1 + exp(x)) without overflow, accurate for tiny results (log1pf, not log(1 + e)).
__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x))); }

// A log-sum-exp kept as (max, sum of exp(x - max)); an empty one is (-inf, 0).
struct Lse {
  float m = kNegInf;
  float l = 0.f;

  // Adds terms whose maximum is tile_max, summing exp(x - new max) via `sum_exp(new max)`.
  template <typename SumExp>
  __device__ __forceinline__ void add(float tile_max, SumExp sum_exp) {
    if (tile_max == kNegInf) return;
    const float m_new = fmaxf(m, tile_max);
    l = l * __expf(m - m_new) + sum_exp(m_new);  // exp(-inf) = 0 while empty
    m = m_new;
  }

  __device__ __forceinline__ void merge(float m2, float l2) {
    const float m_new = fmaxf(m, m2);
    if (m_new == kNegInf) return;
    l = l * __expf(m - m_new) + l2 * __expf(m2 - m_new);
    m = m_new;
  }

  // log(sum): l is 0 (no terms) or >= 1 (the maximum contributes exp(0)), so the log is exact.
  __device__ __forceinline__ float value() const { return l > 0.f ? m + logf(fmaxf(l, 1.f)) : kNegInf; }
};

}  // namespace vlfast::clip_loss
