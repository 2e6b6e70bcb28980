// The forward's pass over the logits: per (row block, column split), the row statistic over the
// split's columns and, for the symmetric softmax, each column's statistic over the row block.
//
// Each column tile of inner products lands in shared memory (tile/dot_tile.cuh); the row pass gives
// each row to NT / BM adjacent threads, which keep a running log-sum-exp of the margins
// z_ij - z_positive (softmax) or a sum of softplus terms (sigmoid) across the split's tiles; the
// column pass reads the same tile down its columns, one warp per 32 columns and slice of rows.
#include "../check.h"
#include "../dtype.cuh"
#include "../nvtx.h"
#include "../tile/dot_tile.cuh"
#include "args.h"
#include "clip_loss.h"
#include "math.cuh"

namespace vlfast::clip_loss {
namespace {

template <typename T>
struct StatsParams {
  const T* a;
  const T* b;
  const float* scale;
  const float* bias;  // null: no bias
  const float* pos;   // (n,) logits at the positives; softmax only
  float* row_part;    // (splits, n)
  float* col_part;    // (row blocks, m); symmetric softmax only
  std::int64_t n, m, d, offset, stride_a, stride_b, cols_per_split;
  bool symmetric;
};

template <typename Tile>
struct StatsShape {
  static constexpr int CG = Tile::BN / 32;               // column pass: 32-column groups ...
  static constexpr int RS = Tile::THREADS / 32 / CG;     // ... times slices of rows, one warp each
  static constexpr int SMEM_BYTES = Tile::SMEM_BYTES + 2 * RS * Tile::BN * int(sizeof(float));
  static_assert(Tile::THREADS % Tile::BM == 0 && Tile::BM % RS == 0, "tile shape");
};

template <typename T, bool SIGMOID>
__global__ void __launch_bounds__(TileFor<T>::type::THREADS, TileFor<T>::type::MIN_BLOCKS) stats_kernel(StatsParams<T> p) {
  using Tile = typename TileFor<T>::type;
  using Shape = StatsShape<Tile>;
  constexpr int BM = Tile::BM, BN = Tile::BN, ZS = Tile::ZS, TPR = Tile::THREADS / BM;
  constexpr int RS = Shape::RS, RPS = BM / RS;

  extern __shared__ __align__(16) char smem[];
  const float* z = reinterpret_cast<const float*>(smem);
  float* col_m = reinterpret_cast<float*>(smem + Tile::SMEM_BYTES);  // [RS][BN] column pass partials
  float* col_l = col_m + RS * BN;

  const int tid = threadIdx.x;
  const std::int64_t row0 = std::int64_t(blockIdx.x) * BM;
  const std::int64_t col_begin = std::int64_t(blockIdx.y) * p.cols_per_split;
  const std::int64_t col_end = min(p.m, col_begin + p.cols_per_split);
  const int nrows = static_cast<int>(min(std::int64_t(BM), p.n - row0));
  const float s = *p.scale, bias = p.bias != nullptr ? *p.bias : 0.f;

  // Row pass: row r of the tile belongs to threads r * TPR .. r * TPR + TPR - 1 (adjacent lanes).
  const int r = tid / TPR, sub = tid % TPR;
  const bool row_ok = r < nrows;
  const std::int64_t row = row0 + r;
  const std::int64_t pos_col = (row_ok && p.offset >= 0) ? row + p.offset : -1;
  const float pos_r = (!SIGMOID && row_ok) ? p.pos[row] : 0.f;
  Lse lse;
  float sum = 0.f;

  TileArgs<T> t{p.a, p.b, row0, 0, p.n, p.m, p.d, p.stride_a, p.stride_b};
  for (std::int64_t c0 = col_begin; c0 < col_end; c0 += BN) {
    t.col0 = c0;
    Tile::dot(t, smem);
    const int ncols = static_cast<int>(min(std::int64_t(BN), col_end - c0));
    if (row_ok) {
      const float* zr = z + r * ZS;
      const std::int64_t pos_here = pos_col - c0;  // the positive's column in this tile, if inside it
      if constexpr (SIGMOID) {
        // softplus(-t z): t = +1 at the positive, -1 elsewhere
        for (int c = sub; c < ncols; c += TPR) {
          const float x = s * zr[c] + bias;
          sum += softplus(c == pos_here ? -x : x);
        }
      } else {
        auto margin = [&](int c) { return c == pos_here ? kNegInf : (s * zr[c] + bias) - pos_r; };
        float tile_max = kNegInf;
        for (int c = sub; c < ncols; c += TPR) tile_max = fmaxf(tile_max, margin(c));
        lse.add(tile_max, [&](float mx) {
          float acc = 0.f;
          for (int c = sub; c < ncols; c += TPR) acc += __expf(margin(c) - mx);
          return acc;
        });
      }
    }
    if constexpr (!SIGMOID) {
      if (p.symmetric) {  // uniform across the block: the barrier below is reached by all
        const int warp = tid >> 5, lane = tid & 31;
        const int c = (warp % Shape::CG) * 32 + lane, slice = warp / Shape::CG;
        const std::int64_t col = c0 + c;
        const bool col_ok = c < ncols;
        const float pos_c = col_ok ? p.pos[col] : 0.f;
        const int r_lo = slice * RPS, r_hi = min(r_lo + RPS, nrows);
        // Square block, positives on the diagonal: column col's positive is row col.
        auto margin = [&](int rr) { return row0 + rr == col ? kNegInf : (s * z[rr * ZS + c] + bias) - pos_c; };
        Lse part;
        if (col_ok) {
          float tile_max = kNegInf;
          for (int rr = r_lo; rr < r_hi; ++rr) tile_max = fmaxf(tile_max, margin(rr));
          part.add(tile_max, [&](float mx) {
            float acc = 0.f;
            for (int rr = r_lo; rr < r_hi; ++rr) acc += __expf(margin(rr) - mx);
            return acc;
          });
        }
        col_m[slice * BN + c] = part.m;
        col_l[slice * BN + c] = part.l;
        __syncthreads();
        if (tid < ncols) {
          Lse all;
          for (int k = 0; k < RS; ++k) all.merge(col_m[k * BN + tid], col_l[k * BN + tid]);
          p.col_part[std::int64_t(blockIdx.x) * p.m + c0 + tid] = all.value();
        }
        // The next tile's dot() starts with a barrier, so these partials are read before reuse.
      }
    }
  }

#pragma unroll
  for (int o = 1; o < TPR; o <<= 1) {
    if constexpr (SIGMOID) {
      sum += __shfl_xor_sync(0xffffffffu, sum, o);
    } else {
      const float m2 = __shfl_xor_sync(0xffffffffu, lse.m, o), l2 = __shfl_xor_sync(0xffffffffu, lse.l, o);
      lse.merge(m2, l2);
    }
  }
  if (sub == 0 && row_ok) p.row_part[std::int64_t(blockIdx.y) * p.n + row] = SIGMOID ? sum : lse.value();
}

template <typename T, bool SIGMOID>
void launch(const char* fn, const StatsParams<T>& p, std::int64_t splits, cudaStream_t stream) {
  using Tile = typename TileFor<T>::type;
  constexpr int smem = StatsShape<Tile>::SMEM_BYTES;
  const dim3 grid(static_cast<unsigned>((p.n + Tile::BM - 1) / Tile::BM), static_cast<unsigned>(splits));
  allow_smem(fn, reinterpret_cast<const void*>(&stats_kernel<T, SIGMOID>), smem);
  stats_kernel<T, SIGMOID><<<grid, Tile::THREADS, smem, stream>>>(p);
  VLFAST_CHECK_LAUNCH(fn, "stats_kernel");
}

}  // namespace

void stats(std::uintptr_t a, std::uintptr_t b, std::uintptr_t scale, std::uintptr_t bias, std::uintptr_t pos,
           std::uintptr_t row_part, std::uintptr_t col_part, std::int64_t n, std::int64_t m, std::int64_t d,
           std::int64_t offset, std::int64_t stride_a, std::int64_t stride_b, std::int64_t cols_per_split,
           std::int64_t splits, bool sigmoid, bool symmetric, int dtype, int device, std::uintptr_t stream) {
  static constexpr const char* fn = "vlfast._C.clip_loss_stats";
  ArgCheck v(fn);
  const DType t = check_inputs(v, dtype, a, b, d, stride_a, stride_b, scale, bias);
  check_layout(v, n, m, offset, sigmoid, symmetric);
  const int bn = tile(dtype).second;
  v.positive("cols_per_split", cols_per_split)
      .require(cols_per_split % bn == 0, "argument 'cols_per_split' must be a multiple of " + std::to_string(bn) +
                                             " (the column tile for " + dtype_name(t) + "), got " +
                                             std::to_string(cols_per_split))
      .require(splits == (m + cols_per_split - 1) / cols_per_split && splits <= 65535,
               "argument 'splits' must be ceil(m / cols_per_split) = " +
                   std::to_string((m + cols_per_split - 1) / cols_per_split) + " (at most 65535), got " +
                   std::to_string(splits));
  if (!sigmoid) v.pointer("pos", pos, 4);
  v.pointer("row_part", row_part, 4);
  if (symmetric) v.pointer("col_part", col_part, 4);
  v.device(device, stream);

  DeviceGuard guard(fn, device);
  NvtxRange range{"vlfast.clip_loss.fwd.stats"};
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    const StatsParams<T> p{reinterpret_cast<const T*>(a), reinterpret_cast<const T*>(b),
                           reinterpret_cast<const float*>(scale), reinterpret_cast<const float*>(bias),
                           reinterpret_cast<const float*>(pos), reinterpret_cast<float*>(row_part),
                           reinterpret_cast<float*>(col_part), n, m, d, offset, stride_a, stride_b,
                           cols_per_split, symmetric};
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    if (sigmoid)
      launch<T, true>(fn, p, splits, s);
    else
      launch<T, false>(fn, p, splits, s);
  });
}

std::pair<int, int> tile(int dtype) {
  const DType t = dtype_arg("vlfast._C.clip_loss_tile", "dtype", dtype);
  std::pair<int, int> shape;
  dispatch_dtype(t, [&](auto tag) {
    using Tile = typename TileFor<decltype(tag)>::type;
    shape = {Tile::BM, Tile::BN};
  });
  return shape;
}

}  // namespace vlfast::clip_loss
