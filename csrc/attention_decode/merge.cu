// The merge kernel of decode attention: one warp per query (b, head, i) weighs its splits' partial
// outputs by their softmax mass exp2(lse_s - max_s lse_s) (as triton.py's _decode_merge), writes the
// output in q's dtype and the natural-log log-sum-exp.
#include <cmath>

#include "../check.h"
#include "../dtype.cuh"
#include "../nvtx.h"
#include "../warp.cuh"
#include "params.h"

namespace vlfast::attention_decode {
namespace {

constexpr int kWarps = 8;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) merge_kernel(DecodeParams p) {
  const int lane = threadIdx.x & 31;
  const std::int64_t query = std::int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (query >= p.batch * p.hq * p.sq) return;
  const float* lse_s = p.lse_part + query * p.splits;
  const float* part = p.o_part + query * p.splits * p.d;

  float m = -INFINITY;
  for (std::int64_t s = lane; s < p.splits; s += 32) m = fmaxf(m, lse_s[s]);
  m = warp_max(m);
  const float m_use = m == -INFINITY ? 0.0f : m;
  float total = 0.0f;  // a NaN partial (a bad length or page) makes it NaN, and so the output
  for (std::int64_t s = lane; s < p.splits; s += 32) total += exp2f(lse_s[s] - m_use);
  total = warp_sum(total);
  const float inv = total == 0.0f ? 0.0f : 1.0f / total;

  const std::int64_t b = query / (p.hq * p.sq), head = (query / p.sq) % p.hq, i = query % p.sq;
  T* out = static_cast<T*>(p.out) + b * p.stride_ob + head * p.stride_oh + i * p.stride_os;
  for (std::int64_t c = lane; c < p.d; c += 32) {
    float x = 0.0f;
    for (std::int64_t s = 0; s < p.splits; ++s) x = fmaf(exp2f(lse_s[s] - m_use), part[s * p.d + c], x);
    out[c] = from_float<T>(x * inv);
  }
  if (lane == 0) p.lse[query] = total == 0.0f ? -INFINITY : (m_use + log2f(total)) * kLn2;
}

}  // namespace

void launch_merge(const char* fn, const DecodeParams& p, DType t, std::uintptr_t stream) {
  NvtxRange range{"vlfast.attention_decode.fwd.merge"};
  const auto queries = p.batch * p.hq * p.sq;
  const auto blocks = static_cast<unsigned>((queries + kWarps - 1) / kWarps);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    merge_kernel<T><<<blocks, kWarps * 32, 0, s>>>(p);
  });
  VLFAST_CHECK_LAUNCH(fn, "attention_decode merge_kernel");
}

}  // namespace vlfast::attention_decode
