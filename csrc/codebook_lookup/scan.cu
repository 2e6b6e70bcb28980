// The scan of certify.py: per (128-row block of z, codebook split), the best score of each row, its
// lowest index and the second-best score, in O(N * splits) memory, never N x K.
//
// Code tiles of 128 stream past the row block. tile/dot_tile.cuh's tensor-core main loop (mma.sync
// m16n8k16, ldmatrix, 3-stage cp.async) leaves each tile's inner products in registers, where every
// thread folds its 8 rows x 8 codes into a Top2 per row (top2.cuh), codes in increasing order; the
// 4 lanes that share those rows then merge them by shuffles into running states of 2 rows each.
// After the split's last tile the 4 warps that share a row merge through shared memory. Ties go to
// the lowest index at every step (top2.cuh). float32 inputs run on the bf16 kernel over split
// pieces (split.h): no fp32 variant, one error model (certify.py).
#include <climits>
#include <string>
#include <type_traits>

#include "../check.h"
#include "../dtype.h"
#include "../nvtx.h"
#include "../tile/dot_tile.cuh"
#include "codebook_lookup.h"
#include "split.h"
#include "top2.cuh"

namespace vlfast::codebook_lookup {
namespace {

template <typename T>
struct ScanParams {
  const T* z;
  const T* e;
  const float* alpha;
  const float* beta;
  float* best;  // (splits, n)
  float* second;
  int* index;
  std::int64_t n, k, d, stride_z, stride_e, codes_per_split;
};

template <typename T>
struct ScanShape {
  using Tile = MmaTile<T>;
  static constexpr int WN = 4;  // warps across the tile's codes (MmaTile's 2 x 4 layout)
  // The pipeline's stages, reused at the end for the cross-warp merge: best, second, index per
  // (warp column, row).
  static constexpr int SMEM_BYTES = Tile::PIPE_BYTES;
  static_assert(WN * Tile::BM * 3 * 4 <= SMEM_BYTES, "the merge's scratch fits in the stages");
  static_assert(SMEM_BYTES <= 48 * 1024, "within the default dynamic shared memory: no opt-in needed");
};

template <typename T>
__global__ void __launch_bounds__(MmaTile<T>::THREADS, MmaTile<T>::MIN_BLOCKS) scan_kernel(ScanParams<T> p) {
  using Tile = MmaTile<T>;
  using Shape = ScanShape<T>;
  constexpr int BM = Tile::BM, BN = Tile::BN, WN = Shape::WN;

  extern __shared__ __align__(16) char smem[];
  const std::int64_t row0 = std::int64_t(blockIdx.x) * BM;
  const std::int64_t start = std::int64_t(blockIdx.y) * p.codes_per_split;
  const std::int64_t end = min(p.k, start + p.codes_per_split);
  const int quad = threadIdx.x & 3;

  // The running state of rows Tile::acc_row(quad, 0) and acc_row(quad, 2). A thread's fragments
  // cover 8 rows; the 4 lanes that share them split the running state 2 rows each, which keeps the
  // state in 6 registers instead of 24 (128 registers are all two blocks per SM can have).
  Top2 run[2];
  float acc[4][4][4];
  // Codes at or past the split's end read as zeros (cols = end) and are masked below.
  TileArgs<T> t{p.z, p.e, row0, start, p.n, end, p.d, p.stride_z, p.stride_e};
  for (std::int64_t c0 = start; c0 < end; c0 += BN) {
    t.col0 = c0;
    Tile::accumulate(t, smem, acc);

    Top2 mine[8];  // this thread's 8 codes of the tile, for rows acc_row(slot / 2, 2 * (slot % 2))
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int q = 0; q < 2; ++q) {  // (ni, q) ascending = this thread's codes ascending
        const std::int64_t col = c0 + Tile::acc_col(ni, q);
        const bool ok = col < end;
        // Past the split: alpha 0, beta +inf give +inf, never chosen (as in the Triton scan).
        const float a = ok ? p.alpha[col] : 0.f, b = ok ? p.beta[col] : INFINITY;
#pragma unroll
        for (int slot = 0; slot < 8; ++slot)
          mine[slot].push(fmaf(a, acc[slot / 2][ni][2 * (slot % 2) + q], b), static_cast<int>(col));
      }

    // Reduce-scatter over the quad: lane bit 1 picks slots 0-3 or 4-7, bit 0 the pair inside them,
    // so lane `quad` ends with slots 2 quad and 2 quad + 1. Selects, not dynamic indexing: the
    // arrays stay in registers.
    Top2 half[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const Top2 give = (quad & 2) ? mine[i] : mine[4 + i];
      half[i] = (quad & 2) ? mine[4 + i] : mine[i];
      half[i].merge(shfl_xor(give, 2));
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const Top2 give = (quad & 1) ? half[i] : half[2 + i];
      Top2 keep = (quad & 1) ? half[2 + i] : half[i];
      keep.merge(shfl_xor(give, 1));
      run[i].merge(keep);
    }
  }

  // The WN warps that hold the same rows merge through shared memory.
  __syncthreads();  // every warp is past the main loop: its stages are free
  float* m_best = reinterpret_cast<float*>(smem);  // [WN][BM]
  float* m_second = m_best + WN * BM;
  int* m_index = reinterpret_cast<int*>(m_second + WN * BM);
  const int wn = (threadIdx.x >> 5) & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int at = wn * BM + Tile::acc_row(quad, 2 * h);
    m_best[at] = run[h].best;
    m_second[at] = run[h].second;
    m_index[at] = run[h].index;
  }
  __syncthreads();
  const int r = threadIdx.x;
  if (r < BM && row0 + r < p.n) {
    Top2 all{m_best[r], m_second[r], m_index[r]};
#pragma unroll
    for (int w = 1; w < WN; ++w) all.merge(m_best[w * BM + r], m_second[w * BM + r], m_index[w * BM + r]);
    const std::int64_t out = std::int64_t(blockIdx.y) * p.n + row0 + r;
    p.best[out] = all.best;
    p.second[out] = all.second;
    p.index[out] = all.index;
  }
}

template <typename T>
void launch(const char* fn, const ScanParams<T>& p, std::int64_t splits, cudaStream_t stream) {
  using Tile = MmaTile<T>;
  const dim3 grid(static_cast<unsigned>((p.n + Tile::BM - 1) / Tile::BM), static_cast<unsigned>(splits));
  scan_kernel<T><<<grid, Tile::THREADS, ScanShape<T>::SMEM_BYTES, stream>>>(p);
  VLFAST_CHECK_LAUNCH(fn, "scan_kernel");
}

}  // namespace

std::pair<int, int> tile(int dtype) {
  dtype_arg("vlfast._C.codebook_lookup_tile", "dtype", dtype);  // every dtype runs the 16-bit tile
  return {MmaTile<__nv_bfloat16>::BM, MmaTile<__nv_bfloat16>::BN};
}

void scan(std::uintptr_t z, std::uintptr_t e, std::uintptr_t alpha, std::uintptr_t beta, std::uintptr_t best,
          std::uintptr_t second, std::uintptr_t index, std::uintptr_t work, std::int64_t work_size, std::int64_t n,
          std::int64_t k, std::int64_t d, std::int64_t stride_z, std::int64_t stride_e, std::int64_t codes_per_split,
          std::int64_t splits, int dtype, int device, std::uintptr_t stream) {
  static constexpr const char* fn = "vlfast._C.codebook_lookup_scan";
  ArgCheck v(fn);
  const DType t = dtype_arg(fn, "dtype", dtype);
  const std::int64_t need = checked_work_bytes(v, t, n, k, d);
  v.require(k <= INT_MAX, "argument 'k' must be at most 2^31 - 1 (indices are int32), got " + std::to_string(k));
  if (t == DType::f32) {  // read one element at a time by the split pre-pass
    v.rows("z", z, stride_z, d, 4).rows("e", e, stride_e, d, 4);
  } else {  // read in 16-byte chunks by cp.async
    v.rows16("z", z, stride_z, d, 2).rows16("e", e, stride_e, d, 2);
  }
  v.pointer("alpha", alpha, 4).pointer("beta", beta, 4);
  v.pointer("best", best, 4).pointer("second", second, 4).pointer("index", index, 4);
  const auto [bm, bn] = tile(dtype);
  v.positive("codes_per_split", codes_per_split)
      .require(codes_per_split % bn == 0, "argument 'codes_per_split' must be a multiple of " + std::to_string(bn) +
                                              " (the scan's code tile), got " + std::to_string(codes_per_split))
      .require(splits == (k + codes_per_split - 1) / codes_per_split && splits <= 65535,
               "argument 'splits' must be ceil(k / codes_per_split) = " +
                   std::to_string((k + codes_per_split - 1) / codes_per_split) + " (at most 65535), got " +
                   std::to_string(splits));
  v.require((n + bm - 1) / bm <= INT_MAX, "argument 'n' is too large for one launch: " + std::to_string(n) + " rows");
  if (need > 0) {
    v.pointer("work", work, 16);
    v.require(work_size >= need, "argument 'work_size' must be at least work_bytes(n, k, d, dtype) = " +
                                     std::to_string(need) + " for float32 inputs, got " + std::to_string(work_size));
  }
  v.device(device, stream);

  DeviceGuard guard(fn, device);
  NvtxRange range{"vlfast.codebook_lookup.fwd.scan"};
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  auto params = [&](auto* zz, auto* ee, std::int64_t dd, std::int64_t sz, std::int64_t se) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(zz)>>;
    return ScanParams<T>{zz, ee, reinterpret_cast<const float*>(alpha), reinterpret_cast<const float*>(beta),
                         reinterpret_cast<float*>(best), reinterpret_cast<float*>(second),
                         reinterpret_cast<int*>(index), n, k, dd, sz, se, codes_per_split};
  };
  switch (t) {
    case DType::f32: {
      auto* zs = reinterpret_cast<__nv_bfloat16*>(work);
      auto* es = zs + n * split_stride(d);
      split_bf16x3(fn, reinterpret_cast<const float*>(z), n, d, stride_z, zs, /*lo_piece=*/2, s);
      split_bf16x3(fn, reinterpret_cast<const float*>(e), k, d, stride_e, es, /*lo_piece=*/1, s);
      const std::int64_t ws = split_stride(d);
      launch(fn, params(static_cast<const __nv_bfloat16*>(zs), static_cast<const __nv_bfloat16*>(es),
                        kSplitPieces * d, ws, ws), splits, s);
      break;
    }
    case DType::f16:
      launch(fn, params(reinterpret_cast<const __half*>(z), reinterpret_cast<const __half*>(e), d, stride_z, stride_e),
             splits, s);
      break;
    case DType::bf16:
      launch(fn, params(reinterpret_cast<const __nv_bfloat16*>(z), reinterpret_cast<const __nv_bfloat16*>(e), d,
                        stride_z, stride_e), splits, s);
      break;
  }
}

}  // namespace vlfast::codebook_lookup
