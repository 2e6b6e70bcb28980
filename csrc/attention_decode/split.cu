// The split kernel of decode attention (Flash-Decoding): one CTA per (row b, kv head g, split s)
// walks its split's keys in blocks of kBlockKeys and writes, for each of the GQA group's G * sq
// query rows, the split's normalised partial output and base-2 log-sum-exp (float32). merge.cu
// combines the splits. Row b's L_b keys are cut into `splits` equal runs of whole blocks, as in
// triton.py, so the partials of both paths mean the same.
//
// CUDA cores, fp32 math. Per key block the CTA stages K and V (converted to float) in shared memory,
// in 16-byte pieces where the cache's rows allow it (else element by element);
// each warp owns two query rows: lane j scores key j against both (its own K row, the query rows
// broadcast), the warp's shuffles give the online-softmax max and sum, and each lane accumulates
// the output dims lane, lane + 32, ... over the block's keys. The group's rows are taken sixteen at
// a time (kChunkRows), so a group of more than 16 rows (long query blocks) reads its keys again per
// chunk, from L2; a decode step (sq = 1, G <= 16) reads every key and value byte once.
#include <cmath>
#include <string>

#include "../check.h"
#include "../dtype.cuh"
#include "../nvtx.h"
#include "../warp.cuh"
#include "mask.cuh"
#include "params.h"

namespace vlfast::attention_decode {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 2;
constexpr int kChunkRows = kWarps * kRowsPerWarp;
constexpr int kBlockKeys = 32;  // one key per lane when scoring

// Shared-memory row stride in floats: odd, so lanes reading K rows j = lane hit distinct banks.
__host__ __device__ __forceinline__ int smem_ld(std::int64_t d) { return static_cast<int>(d) | 1; }

std::size_t smem_bytes(std::int64_t d) {
  return sizeof(float) * (static_cast<std::size_t>(2 * kBlockKeys + kChunkRows) * smem_ld(d) + kChunkRows * kBlockKeys);
}

// Where key position pos of row b lives: (page, slot) of the cache, and whether the page index is
// inside it (a contiguous cache's page is the row itself).
struct KeyAddress {
  std::int64_t page, slot;
  bool in_cache;
};

__device__ __forceinline__ KeyAddress key_address(const DecodeParams& p, std::int64_t b, std::int64_t pos) {
  if (p.block_table == nullptr) return {b, pos, true};
  const std::int64_t page = p.block_table[b * p.stride_bt + pos / p.page_size];
  return {page, pos % p.page_size, page >= 0 && page < p.cache_rows};
}

// Stages keys [n0, n0 + kBlockKeys) of row b, kv head g, into k_s / v_s (kBlockKeys x ld floats): zeros
// past `end` (never NaN from slots past the length), NaN for a page index outside the cache. VEC: each
// thread copies 16-byte pieces (p.vector_loads), else single elements.
template <typename T, bool VEC>
__device__ void stage_keys(const DecodeParams& p, std::int64_t b, std::int64_t g, std::int64_t n0,
                           std::int64_t end, float* k_s, float* v_s, int ld) {
  constexpr int kPiece = VEC ? 16 / sizeof(T) : 1;  // elements per copy
  const int pieces = static_cast<int>(p.d) / kPiece;
  for (int idx = threadIdx.x; idx < kBlockKeys * pieces; idx += kThreads) {
    const int j = idx / pieces, c = idx % pieces * kPiece;
    const std::int64_t pos = n0 + j;
    alignas(16) T kx[kPiece], vx[kPiece];
    float fill = 0.0f;  // past the end
    if (pos < end) {
      const KeyAddress a = key_address(p, b, pos);
      if (a.in_cache) {
        const T* k_row = static_cast<const T*>(p.k) + a.page * p.stride_kb + g * p.stride_kh + a.slot * p.stride_ks;
        const T* v_row = static_cast<const T*>(p.v) + a.page * p.stride_vb + g * p.stride_vh + a.slot * p.stride_vs;
        if constexpr (VEC) {
          *reinterpret_cast<float4*>(kx) = *reinterpret_cast<const float4*>(k_row + c);
          *reinterpret_cast<float4*>(vx) = *reinterpret_cast<const float4*>(v_row + c);
        } else {
          kx[0] = k_row[c];
          vx[0] = v_row[c];
        }
#pragma unroll
        for (int e = 0; e < kPiece; ++e) {
          k_s[j * ld + c + e] = to_float(kx[e]);
          v_s[j * ld + c + e] = to_float(vx[e]);
        }
        continue;
      }
      fill = NAN;  // a page outside the cache
    }
#pragma unroll
    for (int e = 0; e < kPiece; ++e) k_s[j * ld + c + e] = v_s[j * ld + c + e] = fill;
  }
}

// DPL: output dims per lane, ceil(d / 32) rounded up to 2, 4 or 8.
template <typename T, int DPL, bool VEC>
__global__ void __launch_bounds__(kThreads, 2) split_kernel(DecodeParams p) {
  extern __shared__ __align__(16) char smem[];
  const int ld = smem_ld(p.d);
  float* k_s = reinterpret_cast<float*>(smem);  // [kBlockKeys][ld]
  float* v_s = k_s + kBlockKeys * ld;           // [kBlockKeys][ld]
  float* q_s = v_s + kBlockKeys * ld;           // [kChunkRows][ld], scaled by qk_scale
  float* p_s = q_s + kChunkRows * ld;           // [kChunkRows][kBlockKeys], this block's probabilities

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const std::int64_t b = blockIdx.x / p.hkv, g = blockIdx.x % p.hkv, split = blockIdx.y;
  const std::int64_t group = p.hq / p.hkv, rows = group * p.sq;
  const std::int64_t length = p.lengths[b];
  const std::int64_t capacity = p.max_pages > 0 ? p.max_pages * p.page_size : p.page_size;
  const bool bad_length = length < 0 || length > capacity;
  const std::int64_t per_split =
      bad_length ? 0 : ((length + p.splits - 1) / p.splits + kBlockKeys - 1) / kBlockKeys * kBlockKeys;
  const std::int64_t start = split * per_split;
  const std::int64_t end = min(length, start + per_split);
  const T* q = static_cast<const T*>(p.q);

  for (std::int64_t r0 = 0; r0 < rows; r0 += kChunkRows) {
    __syncthreads();  // the previous chunk's readers of q_s are done
    for (int idx = threadIdx.x; idx < kChunkRows * p.d; idx += kThreads) {
      const int r = idx / static_cast<int>(p.d), c = idx % static_cast<int>(p.d);
      const std::int64_t row = r0 + r;
      float x = 0.0f;
      if (row < rows) {
        const std::int64_t head = g * group + row / p.sq, i = row % p.sq;
        x = to_float(q[b * p.stride_qb + head * p.stride_qh + i * p.stride_qs + c]) * p.qk_scale;
      }
      q_s[r * ld + c] = x;
    }

    float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][DPL];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      m[rr] = -INFINITY;
      l[rr] = 0.0f;
#pragma unroll
      for (int c = 0; c < DPL; ++c) acc[rr][c] = 0.0f;
    }

    for (std::int64_t n0 = start; n0 < end; n0 += kBlockKeys) {
      __syncthreads();  // q_s written; the previous block's readers of k_s / v_s are done
      stage_keys<T, VEC>(p, b, g, n0, end, k_s, v_s, ld);
      __syncthreads();
      const std::int64_t pk = n0 + lane;
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp * kRowsPerWarp + rr;
        if (r0 + r >= rows) continue;  // uniform across the warp
        const std::int64_t pq = length - p.sq + (r0 + r) % p.sq;
        float s = 0.0f;
        for (int c = 0; c < p.d; ++c) s = fmaf(q_s[r * ld + c], k_s[lane * ld + c], s);
        if (pk >= end || !keeps(p, b, pq, pk)) s = -INFINITY;
        const float m_new = fmaxf(m[rr], warp_max(s));
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // nothing kept yet: every exp2 is 0
        const float prob = exp2f(s - m_use);
        const float alpha = exp2f(m[rr] - m_use);
        l[rr] = l[rr] * alpha + warp_sum(prob);
        m[rr] = m_new;
        p_s[r * kBlockKeys + lane] = prob;
#pragma unroll
        for (int c = 0; c < DPL; ++c) acc[rr][c] *= alpha;
      }
      __syncwarp();  // this warp's probabilities are in p_s
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp * kRowsPerWarp + rr;
        if (r0 + r >= rows) continue;
        for (int j = 0; j < kBlockKeys; ++j) {
          const float prob = p_s[r * kBlockKeys + j];
#pragma unroll
          for (int c = 0; c < DPL; ++c) {
            const int dim = lane + 32 * c;
            if (dim < p.d) acc[rr][c] = fmaf(prob, v_s[j * ld + dim], acc[rr][c]);
          }
        }
      }
    }

#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const std::int64_t row = r0 + warp * kRowsPerWarp + rr;
      if (row >= rows) continue;
      const std::int64_t head = g * group + row / p.sq, i = row % p.sq;
      const std::int64_t slot = ((b * p.hq + head) * p.sq + i) * p.splits + split;
      const bool empty = l[rr] == 0.0f;
      const float inv = empty ? 0.0f : 1.0f / l[rr];
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        const int dim = lane + 32 * c;
        if (dim < p.d) p.o_part[slot * p.d + dim] = bad_length ? NAN : acc[rr][c] * inv;
      }
      if (lane == 0) p.lse_part[slot] = bad_length ? NAN : empty ? -INFINITY : m[rr] + log2f(l[rr]);
    }
  }
}

template <typename T, int DPL, bool VEC>
void launch_variant(const char* fn, const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.batch * p.hkv), static_cast<unsigned>(p.splits));
  const auto bytes = static_cast<int>(smem_bytes(p.d));
  VLFAST_CHECK_CUDA(fn, cudaFuncSetAttribute(reinterpret_cast<const void*>(&split_kernel<T, DPL, VEC>),
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  split_kernel<T, DPL, VEC><<<grid, kThreads, bytes, stream>>>(p);
  VLFAST_CHECK_LAUNCH(fn, "attention_decode split_kernel");
}

template <typename T, int DPL>
void launch(const char* fn, const DecodeParams& p, cudaStream_t stream) {
  if (p.vector_loads)
    launch_variant<T, DPL, true>(fn, p, stream);
  else
    launch_variant<T, DPL, false>(fn, p, stream);
}

}  // namespace

void launch_split(const char* fn, const DecodeParams& p, DType t, std::uintptr_t stream) {
  NvtxRange range{"vlfast.attention_decode.fwd.split"};
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    if (p.d <= 64)
      launch<T, 2>(fn, p, s);
    else if (p.d <= 128)
      launch<T, 4>(fn, p, s);
    else
      launch<T, 8>(fn, p, s);
  });
}

}  // namespace vlfast::attention_decode
