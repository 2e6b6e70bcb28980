// The mask's predicate at cache positions: vlfast.masks.Mask.allowed (and the Triton kernels'
// _keep_tile) for one query position pq and one key position pk < L_b of row b.
#pragma once

#include <cstdint>

#include "params.h"

namespace vlfast::attention_decode {

// Python's floor division and modulo (DALL-E's grid coordinates of positions before the image).
__device__ __forceinline__ std::int64_t floor_div(std::int64_t a, std::int64_t n) {
  return a >= 0 ? a / n : -((-a + n - 1) / n);
}

// per_token[b * stride + pos], or `outside` for a position it does not cover (as masks._gather).
template <typename V>
__device__ __forceinline__ int token_value(const V* per_token, std::int64_t len, std::int64_t stride, std::int64_t b,
                                           std::int64_t pos, int outside) {
  return pos >= 0 && pos < len ? static_cast<int>(per_token[b * stride + pos]) : outside;
}

__device__ __forceinline__ bool dalle_image_keeps(const DecodeParams& p, std::int64_t pq, std::int64_t pk) {
  const std::int64_t rq = floor_div(pq - p.text_len, p.cols), cq = pq - p.text_len - rq * p.cols;
  const std::int64_t rk = floor_div(pk - p.text_len, p.cols), ck = pk - p.text_len - rk * p.cols;
  if (p.dalle_kind == 1) return rq == rk;
  if (p.dalle_kind == 2) return cq == ck;
  const std::int64_t dr = rq - rk, dc = cq - ck;
  return dr <= p.dalle_half && dr >= -p.dalle_half && dc <= p.dalle_half && dc >= -p.dalle_half;
}

__device__ __forceinline__ bool keeps(const DecodeParams& p, std::int64_t b, std::int64_t pq, std::int64_t pk) {
  bool keep = true;
  if (p.causal) {
    keep = pk <= pq;
    if (!keep && p.span_ids != nullptr) {  // a span relaxes causality between its own tokens
      const int span_q = token_value(p.span_ids, p.span_len, p.span_stride, b, pq, -2);
      keep = span_q >= 0 && span_q == token_value(p.span_ids, p.span_len, p.span_stride, b, pk, -3);
    }
  }
  if (p.window > 0) keep = keep && pq - pk < p.window;
  if (p.dalle_kind != 0) keep = keep && (pk < p.text_len || dalle_image_keeps(p, pq, pk));
  if (p.key_valid != nullptr) keep = keep && token_value(p.key_valid, p.valid_len, p.valid_stride, b, pk, 0) != 0;
  return keep;
}

}  // namespace vlfast::attention_decode
