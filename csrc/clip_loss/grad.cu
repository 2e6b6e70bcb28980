// The backward's kernel: for a chunk of rows, recompute a tile of inner products and write
// G = scale * dLoss/dz in the input dtype (the two GEMMs d_a = G @ b and d_b += G^T @ a run in
// cuBLAS through torch), plus per-program float32 partial sums for d_scale and d_bias.
//
// One tile per program on a 1-D grid walked in groups of 8 row tiles, so that the column tiles a
// group reads are still in L2 for its other row tiles.
#include "../check.h"
#include "../dtype.cuh"
#include "../nvtx.h"
#include "../tile/dot_tile.cuh"
#include "args.h"
#include "clip_loss.h"
#include "math.cuh"

namespace vlfast::clip_loss {
namespace {

constexpr int kGroupRows = 8;

template <typename T>
struct GradParams {
  const T* a;  // row r0 of the features
  const T* b;
  T* g;        // (c, m), row stride stride_g
  const float* scale;
  const float* bias;
  const float* stats;  // (3, n): logit at the positive, row loss, column loss
  const float* em;     // (2, n): expm1(-row loss), expm1(-column loss)
  const float* w;      // (n,) upstream gradient per row
  float* ds_part;
  float* db_part;
  std::int64_t c, n, m, d, r0, offset, stride_a, stride_b, stride_g;
  bool symmetric;
};

template <typename Tile>
struct GradShape {
  static constexpr int V = 4;                              // elements a thread writes at once
  static constexpr int LANES_PER_ROW = Tile::BN / V;
  static constexpr int ROWS_PER_PASS = Tile::THREADS / LANES_PER_ROW;
  static constexpr int WARPS = Tile::THREADS / 32;
  // after the tile: per-row and per-column factors (4 each), then the block reduction's scratch
  static constexpr int SMEM_BYTES = Tile::SMEM_BYTES + (4 * (Tile::BM + Tile::BN) + 2 * WARPS) * int(sizeof(float));
};

template <typename T>
__device__ __forceinline__ void store4(T* dst, const float (&v)[4]) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    alignas(8) T h[4] = {from_float<T>(v[0]), from_float<T>(v[1]), from_float<T>(v[2]), from_float<T>(v[3])};
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(h);
  }
}

template <typename T, bool SIGMOID>
__global__ void __launch_bounds__(TileFor<T>::type::THREADS, TileFor<T>::type::MIN_BLOCKS) grad_kernel(GradParams<T> p) {
  using Tile = typename TileFor<T>::type;
  using Shape = GradShape<Tile>;
  constexpr int BM = Tile::BM, BN = Tile::BN, ZS = Tile::ZS, NT = Tile::THREADS, V = Shape::V;

  extern __shared__ __align__(16) char smem[];
  const float* z = reinterpret_cast<const float*>(smem);
  float* rowv = reinterpret_cast<float*>(smem + Tile::SMEM_BYTES);  // [4][BM]: pos, loss, expm1(-loss), w
  float* colv = rowv + 4 * BM;                                        // [4][BN]: the same per column
  float* red = colv + 4 * BN;                                         // [2][WARPS]

  const int tid = threadIdx.x;
  const std::int64_t tiles_m = (p.c + BM - 1) / BM, tiles_n = (p.m + BN - 1) / BN;
  const std::int64_t pid = blockIdx.x, per_group = kGroupRows * tiles_n;
  const std::int64_t first_m = pid / per_group * kGroupRows;
  const std::int64_t group = min(tiles_m - first_m, std::int64_t(kGroupRows));
  const std::int64_t local0 = (first_m + pid % per_group % group) * BM;
  const std::int64_t col0 = pid % per_group / group * BN;
  const float s = *p.scale, bias = p.bias != nullptr ? *p.bias : 0.f;

  // Stage the factors; dot() below starts and ends with barriers, which publish them.
  for (int i = tid; i < BM; i += NT) {
    const std::int64_t local = local0 + i, row = p.r0 + local;
    const bool ok = local < p.c;
    rowv[3 * BM + i] = ok ? p.w[row] : 0.f;
    if (!SIGMOID) {
      rowv[i] = ok ? p.stats[row] : 0.f;
      rowv[BM + i] = ok ? p.stats[p.n + row] : 0.f;
      rowv[2 * BM + i] = ok ? p.em[row] : 0.f;
    }
  }
  if (!SIGMOID && p.symmetric) {
    for (int i = tid; i < BN; i += NT) {
      const std::int64_t col = col0 + i;
      const bool ok = col < p.m;
      colv[i] = ok ? p.stats[col] : 0.f;
      colv[BN + i] = ok ? p.stats[2 * p.n + col] : 0.f;
      colv[2 * BN + i] = ok ? p.em[p.n + col] : 0.f;
      colv[3 * BN + i] = ok ? p.w[col] : 0.f;
    }
  }
  Tile::dot(TileArgs<T>{p.a, p.b, local0, col0, p.c, p.m, p.d, p.stride_a, p.stride_b}, smem);

  // Each thread takes V adjacent columns of a row: coalesced stores of G.
  const int cv = (tid % Shape::LANES_PER_ROW) * V;
  float ds = 0.f, db = 0.f;
  for (int r = tid / Shape::LANES_PER_ROW; r < BM; r += Shape::ROWS_PER_PASS) {
    const std::int64_t local = local0 + r;
    if (local >= p.c) break;  // later rows are past the chunk too
    const std::int64_t row = p.r0 + local;
    const std::int64_t pos_col = p.offset >= 0 ? row + p.offset : -1;
    const float2 z01 = *reinterpret_cast<const float2*>(z + r * ZS + cv);
    const float2 z23 = *reinterpret_cast<const float2*>(z + r * ZS + cv + 2);
    const float dots[V] = {z01.x, z01.y, z23.x, z23.y};
    const float w_r = rowv[3 * BM + r];
    float out[V];
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const std::int64_t col = col0 + cv + q;
      float g = 0.f;
      if (col < p.m) {
        const float zz = s * dots[q] + bias;
        const bool is_pos = col == pos_col;
        if constexpr (SIGMOID) {
          // d softplus(-t z)/dz = -t sigmoid(-t z), t = +1 at the positive; exp(-|x|) never overflows
          const float x = is_pos ? zz : -zz;
          const float e = __expf(-fabsf(x));
          const float sig = x >= 0.f ? e / (1.f + e) : 1.f / (1.f + e);  // sigmoid(-x)
          g = w_r * (is_pos ? -sig : sig);
        } else {
          // softmax - 1 at the positive is expm1(-loss): no cancellation when the loss is tiny
          g = w_r * (is_pos ? rowv[2 * BM + r] : __expf(zz - rowv[r] - rowv[BM + r]));
          if (p.symmetric) {
            const int k = cv + q;
            g += colv[3 * BN + k] * (is_pos ? colv[2 * BN + k] : __expf(zz - colv[k] - colv[BN + k]));
          }
        }
      }
      ds += g * dots[q];
      db += g;
      out[q] = s * g;
    }
    T* dst = p.g + local * p.stride_g + col0 + cv;
    if (col0 + cv + V <= p.m) {
      store4(dst, out);  // rows of G start on 16-byte boundaries (checked on the host)
    } else {
      for (int q = 0; q < V && col0 + cv + q < p.m; ++q) dst[q] = from_float<T>(out[q]);
    }
  }

  // Fixed-order reduction: the backward is bitwise deterministic.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    ds += __shfl_xor_sync(0xffffffffu, ds, o);
    db += __shfl_xor_sync(0xffffffffu, db, o);
  }
  const int warp = tid >> 5;
  if ((tid & 31) == 0) {
    red[warp] = ds;
    red[Shape::WARPS + warp] = db;
  }
  __syncthreads();
  if (tid == 0) {
    float ds_all = 0.f, db_all = 0.f;
    for (int i = 0; i < Shape::WARPS; ++i) {
      ds_all += red[i];
      db_all += red[Shape::WARPS + i];
    }
    p.ds_part[pid] = ds_all;
    if (SIGMOID) p.db_part[pid] = db_all;  // softmax logits are shift-invariant: d_bias is exactly 0
  }
}

template <typename T, bool SIGMOID>
void launch(const char* fn, const GradParams<T>& p, std::int64_t programs, cudaStream_t stream) {
  using Tile = typename TileFor<T>::type;
  constexpr int smem = GradShape<Tile>::SMEM_BYTES;
  allow_smem(fn, reinterpret_cast<const void*>(&grad_kernel<T, SIGMOID>), smem);
  grad_kernel<T, SIGMOID><<<static_cast<unsigned>(programs), Tile::THREADS, smem, stream>>>(p);
  VLFAST_CHECK_LAUNCH(fn, "grad_kernel");
}

}  // namespace

void grad(std::uintptr_t a, std::uintptr_t b, std::uintptr_t g, std::uintptr_t scale, std::uintptr_t bias,
          std::uintptr_t stats, std::uintptr_t em, std::uintptr_t w, std::uintptr_t ds_part, std::uintptr_t db_part,
          std::int64_t c, std::int64_t n, std::int64_t m, std::int64_t d, std::int64_t r0, std::int64_t offset,
          std::int64_t stride_a, std::int64_t stride_b, std::int64_t stride_g, std::int64_t parts, bool sigmoid,
          bool symmetric, int dtype, int device, std::uintptr_t stream) {
  static constexpr const char* fn = "vlfast._C.clip_loss_grad";
  ArgCheck v(fn);
  const DType t = check_inputs(v, dtype, a, b, d, stride_a, stride_b, scale, bias);
  check_layout(v, n, m, offset, sigmoid, symmetric);
  v.positive("c", c).require(r0 >= 0 && r0 + c <= n, "arguments 'r0' and 'c' must select rows inside [0, n = " +
                                                          std::to_string(n) + "), got r0 = " + std::to_string(r0) +
                                                          ", c = " + std::to_string(c));
  v.rows16("g", g, stride_g, m, dtype_size(t));
  v.pointer("stats", stats, 4).pointer("w", w, 4).pointer("ds_part", ds_part, 4);
  if (!sigmoid) v.pointer("em", em, 4);
  if (sigmoid) v.pointer("db_part", db_part, 4);
  const auto [bm, bn] = tile(dtype);
  const std::int64_t programs = ((c + bm - 1) / bm) * ((m + bn - 1) / bn);
  v.require(programs <= 0x7fffffff, "the chunk has too many tiles for one launch; use fewer rows per chunk");
  v.require(parts >= programs, "argument 'parts' (the length of ds_part / db_part) must be at least the " +
                                   std::to_string(programs) + " programs of this chunk, got " + std::to_string(parts));
  v.device(device, stream);

  DeviceGuard guard(fn, device);
  NvtxRange range{"vlfast.clip_loss.bwd.grad"};
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    const GradParams<T> p{reinterpret_cast<const T*>(a), reinterpret_cast<const T*>(b), reinterpret_cast<T*>(g),
                          reinterpret_cast<const float*>(scale), reinterpret_cast<const float*>(bias),
                          reinterpret_cast<const float*>(stats), reinterpret_cast<const float*>(em),
                          reinterpret_cast<const float*>(w), reinterpret_cast<float*>(ds_part),
                          reinterpret_cast<float*>(db_part), c, n, m, d, r0, offset, stride_a, stride_b, stride_g,
                          symmetric};
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    if (sigmoid)
      launch<T, true>(fn, p, programs, s);
    else
      launch<T, false>(fn, p, programs, s);
  });
}

}  // namespace vlfast::clip_loss
