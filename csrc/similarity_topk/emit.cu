// The candidate filter of the exact top-k search: per (128-row block of queries, key split), every
// pair whose low-precision score reaches its row's threshold goes to the row's candidate buffer, in
// O(N * capacity) memory, never N x M.
//
// Key tiles of 128 stream past the row block. tile/dot_tile.cuh's tensor-core main loop (mma.sync
// m16n8k16, ldmatrix, 3-stage cp.async) leaves each tile's inner products in registers, where every
// thread scores its 8 rows x 8 keys (s = alpha_j dot + beta_j, one fma: the codebook scan's
// arithmetic, so certify.py's error model holds) and compares them with its rows' thresholds.
// Usually no pair of a warp's 64 x 32 qualifies: one vote and the warp moves on. Otherwise each
// thread marks its hits in a 64-bit mask, takes one atomicAdd on the row's count per row with hits
// (reserving as many slots as it has hits there) and writes the hits into those slots. float32
// inputs run on the bf16 kernel over split pieces (codebook_lookup/split.h): no fp32 variant, one
// error model.
#include <climits>
#include <cmath>
#include <string>
#include <type_traits>

#include "../check.h"
#include "../codebook_lookup/split.h"
#include "../dtype.h"
#include "../nvtx.h"
#include "../tile/dot_tile.cuh"
#include "similarity_topk.h"

namespace vlfast::similarity_topk {
namespace {

using codebook_lookup::kSplitPieces;
using codebook_lookup::split_bf16x3;
using codebook_lookup::split_stride;

template <typename T>
struct EmitParams {
  const T* q;
  const T* keys;
  const float* alpha;
  const float* beta;
  const float* threshold;
  int* count;  // (n,)
  int* cols;   // (n, capacity)
  float* scores;
  std::int64_t n, m, d, stride_q, stride_k, capacity, keys_per_split;
};

template <typename T>
__global__ void __launch_bounds__(MmaTile<T>::THREADS, MmaTile<T>::MIN_BLOCKS) emit_kernel(EmitParams<T> p) {
  using Tile = MmaTile<T>;
  constexpr int BM = Tile::BM, BN = Tile::BN;
  static_assert(Tile::PIPE_BYTES <= 48 * 1024, "within the default dynamic shared memory: no opt-in needed");

  extern __shared__ __align__(16) char smem[];
  const std::int64_t row0 = std::int64_t(blockIdx.x) * BM;
  const std::int64_t start = std::int64_t(blockIdx.y) * p.keys_per_split;
  const std::int64_t end = min(p.m, start + p.keys_per_split);

  // A thread's pairs are (slot, ni, q): row Tile::acc_row(slot / 2, 2 * (slot % 2)), key
  // acc_col(ni, q), inner product acc[slot / 2][ni][2 * (slot % 2) + q]. The thresholds of its 8
  // rows are read once; rows past n get NaN: nothing compares >= NaN, so they never emit and the
  // compares need no row mask.
  float thr[8];
#pragma unroll
  for (int slot = 0; slot < 8; ++slot) {
    const std::int64_t row = row0 + Tile::acc_row(slot / 2, 2 * (slot % 2));
    thr[slot] = row < p.n ? p.threshold[row] : NAN;
  }

  float acc[4][4][4];
  // Keys at or past the split's end read as zeros (cols = end) and score NaN below.
  TileArgs<T> t{p.q, p.keys, row0, start, p.n, end, p.d, p.stride_q, p.stride_k};
  for (std::int64_t c0 = start; c0 < end; c0 += BN) {
    t.col0 = c0;
    Tile::accumulate(t, smem, acc);

    // Compare in registers: two instructions a pair (the fma that forms the score, as the codebook
    // scan forms it; a compare-and-or into a predicate). Past the split alpha 0, beta NaN give NaN,
    // which never qualifies.
    bool any = false;
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const std::int64_t col = c0 + Tile::acc_col(ni, q);
        const bool ok = col < end;
        const float a = ok ? p.alpha[col] : 0.f, b = ok ? p.beta[col] : NAN;
#pragma unroll
        for (int slot = 0; slot < 8; ++slot) any |= fmaf(a, acc[slot / 2][ni][2 * (slot % 2) + q], b) >= thr[slot];
      }
    // The usual case at retrieval's thresholds: no pair of the warp's 64 rows x 32 keys qualifies.
    // One vote, warp-uniform, and the next tile starts.
    if (!__any_sync(0xffffffffu, any)) continue;

    // Some do. The indices below come from a fresh read of threadIdx.x (ptx::thread_index): derived
    // from the loop's own, the compiler would keep this path's 64-bit row and key addresses in
    // registers through the main loop, and spill.
    const unsigned tid = ptx::thread_index();
    // Bit 8 (slot % 4) + 2 ni + q of hits[slot / 4]: whether pair (slot, ni, q) qualifies, so that a
    // row's 8 keys are one byte.
    std::uint32_t hits[2] = {0u, 0u};
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const std::int64_t col = c0 + Tile::acc_col(ni, q, tid);
        const bool ok = col < end;
        const float a = ok ? p.alpha[col] : 0.f, b = ok ? p.beta[col] : NAN;
#pragma unroll
        for (int slot = 0; slot < 8; ++slot) {
          const bool hit = fmaf(a, acc[slot / 2][ni][2 * (slot % 2) + q], b) >= thr[slot];
          hits[slot / 4] |= std::uint32_t(hit) << (8 * (slot % 4) + 2 * ni + q);
        }
      }
    // Per row with hits, one atomicAdd reserves that many slots; then the hits in key order. The
    // inner product of hit `bit` is picked by a chain of selects, not by indexing acc (which would
    // move acc to local memory), and scored again: the same fma gives the same bits.
#pragma unroll
    for (int slot = 0; slot < 8; ++slot) {
      std::uint32_t byte = (hits[slot / 4] >> (8 * (slot % 4))) & 0xffu;
      if (byte == 0u) continue;
      const std::int64_t row = row0 + Tile::acc_row(slot / 2, 2 * (slot % 2), tid);  // < n: thr is NaN past n
      std::int64_t pos = atomicAdd(p.count + row, __popc(byte));
      for (; byte != 0u && pos < p.capacity; byte &= byte - 1u, ++pos) {  // past capacity only the count grows
        const int bit = __ffs(byte) - 1;  // = 2 ni + q
        float dot = acc[slot / 2][0][2 * (slot % 2)];
#pragma unroll
        for (int k = 1; k < 8; ++k) dot = bit == k ? acc[slot / 2][k / 2][2 * (slot % 2) + k % 2] : dot;
        const std::int64_t col = c0 + Tile::acc_col(bit / 2, bit % 2, tid);
        p.cols[row * p.capacity + pos] = static_cast<int>(col);
        p.scores[row * p.capacity + pos] = fmaf(p.alpha[col], dot, p.beta[col]);
      }
    }
  }
}

template <typename T>
void launch(const char* fn, const EmitParams<T>& p, std::int64_t splits, cudaStream_t stream) {
  using Tile = MmaTile<T>;
  const dim3 grid(static_cast<unsigned>((p.n + Tile::BM - 1) / Tile::BM), static_cast<unsigned>(splits));
  emit_kernel<T><<<grid, Tile::THREADS, Tile::PIPE_BYTES, stream>>>(p);
  VLFAST_CHECK_LAUNCH(fn, "emit_kernel");
}

}  // namespace

std::pair<int, int> tile(int dtype) {
  dtype_arg("vlfast._C.similarity_topk_tile", "dtype", dtype);  // every dtype runs the 16-bit tile
  return {MmaTile<__nv_bfloat16>::BM, MmaTile<__nv_bfloat16>::BN};
}

std::int64_t work_bytes(std::int64_t n, std::int64_t m, std::int64_t d, int dtype) {
  static constexpr const char* fn = "vlfast._C.similarity_topk_work_bytes";
  ArgCheck v(fn);
  return codebook_lookup::checked_work_bytes(v, dtype_arg(fn, "dtype", dtype), n, m, d, "m");
}

void emit(std::uintptr_t q, std::uintptr_t keys, std::uintptr_t alpha, std::uintptr_t beta, std::uintptr_t threshold,
          std::uintptr_t count, std::uintptr_t cols, std::uintptr_t scores, std::uintptr_t work,
          std::int64_t work_size, std::int64_t n, std::int64_t m, std::int64_t d, std::int64_t stride_q,
          std::int64_t stride_k, std::int64_t capacity, std::int64_t keys_per_split, std::int64_t splits, int dtype,
          int device, std::uintptr_t stream) {
  static constexpr const char* fn = "vlfast._C.similarity_topk_emit";
  ArgCheck v(fn);
  const DType t = dtype_arg(fn, "dtype", dtype);
  const std::int64_t need = codebook_lookup::checked_work_bytes(v, t, n, m, d, "m");
  v.require(m <= INT_MAX, "argument 'm' must be at most 2^31 - 1 (key indices are int32), got " + std::to_string(m));
  if (t == DType::f32) {  // read one element at a time by the split pre-pass
    v.rows("q", q, stride_q, d, 4).rows("keys", keys, stride_k, d, 4);
  } else {  // read in 16-byte chunks by cp.async
    v.rows16("q", q, stride_q, d, 2).rows16("keys", keys, stride_k, d, 2);
  }
  v.pointer("alpha", alpha, 4).pointer("beta", beta, 4).pointer("threshold", threshold, 4);
  v.pointer("count", count, 4);
  v.require(capacity >= 0, "argument 'capacity' must be >= 0, got " + std::to_string(capacity));
  if (capacity > 0) {
    v.pointer("cols", cols, 4).pointer("scores", scores, 4);
    v.require(capacity <= LLONG_MAX / 8 / n, "arguments 'n' and 'capacity' are too large: n x capacity = " +
                                                 std::to_string(n) + " x " + std::to_string(capacity) + " slots");
  } else {
    v.optional_pointer("cols", cols, 4).optional_pointer("scores", scores, 4);
  }
  const auto [bm, bn] = tile(dtype);
  v.positive("keys_per_split", keys_per_split)
      .require(keys_per_split % bn == 0, "argument 'keys_per_split' must be a multiple of " + std::to_string(bn) +
                                             " (the filter's key tile), got " + std::to_string(keys_per_split))
      .require(splits == (m + keys_per_split - 1) / keys_per_split && splits <= 65535,
               "argument 'splits' must be ceil(m / keys_per_split) = " +
                   std::to_string((m + keys_per_split - 1) / keys_per_split) + " (at most 65535), got " +
                   std::to_string(splits));
  v.require((n + bm - 1) / bm <= INT_MAX, "argument 'n' is too large for one launch: " + std::to_string(n) + " rows");
  if (need > 0) {
    v.pointer("work", work, 16);
    v.require(work_size >= need, "argument 'work_size' must be at least work_bytes(n, m, d, dtype) = " +
                                     std::to_string(need) + " for float32 inputs, got " + std::to_string(work_size));
  }
  v.device(device, stream);

  DeviceGuard guard(fn, device);
  NvtxRange range{"vlfast.similarity_topk.emit"};
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  auto params = [&](auto* qq, auto* kk, std::int64_t dd, std::int64_t sq, std::int64_t sk) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(qq)>>;
    return EmitParams<T>{qq, kk, reinterpret_cast<const float*>(alpha), reinterpret_cast<const float*>(beta),
                         reinterpret_cast<const float*>(threshold), reinterpret_cast<int*>(count),
                         reinterpret_cast<int*>(cols), reinterpret_cast<float*>(scores), n, m, dd, sq, sk, capacity,
                         keys_per_split};
  };
  switch (t) {
    case DType::f32: {
      // The codebook scan's pre-pass: queries take its rows' layout, keys its codes' (split.h).
      auto* qs = reinterpret_cast<__nv_bfloat16*>(work);
      auto* ks = qs + n * split_stride(d);
      split_bf16x3(fn, reinterpret_cast<const float*>(q), n, d, stride_q, qs, /*lo_piece=*/2, s);
      split_bf16x3(fn, reinterpret_cast<const float*>(keys), m, d, stride_k, ks, /*lo_piece=*/1, s);
      const std::int64_t ws = split_stride(d);
      launch(fn, params(static_cast<const __nv_bfloat16*>(qs), static_cast<const __nv_bfloat16*>(ks),
                        kSplitPieces * d, ws, ws), splits, s);
      break;
    }
    case DType::f16:
      launch(fn, params(reinterpret_cast<const __half*>(q), reinterpret_cast<const __half*>(keys), d, stride_q,
                        stride_k), splits, s);
      break;
    case DType::bf16:
      launch(fn, params(reinterpret_cast<const __nv_bfloat16*>(q), reinterpret_cast<const __nv_bfloat16*>(keys), d,
                        stride_q, stride_k), splits, s);
      break;
  }
}

}  // namespace vlfast::similarity_topk
