// One tile of inner products, dot[r][c] = <a[row0 + r], b[col0 + c]>, left as float32 in shared
// memory for an epilogue to read along rows and columns. Both operands are row-major with the
// feature dimension contiguous (the "NT" product of a @ b.T). Two implementations share one shape:
//
//   MmaTile<T>  bf16 / fp16: 128 x 128 tiles, 8 warps of 64 x 32, mma.sync m16n8k16 on tensor cores,
//               fragments by ldmatrix from XOR-swizzled shared memory, a 3-stage cp.async pipeline
//               over the features in steps of 32. accumulate() leaves the tile in registers (mma
//               fragments; acc_row / acc_col say which element is which) for epilogues that reduce
//               along rows there; dot() stores it to shared memory.
//   FmaTile     fp32: 64 x 64 tiles, 4 x 4 outputs a thread on the FMA units (exact fp32, as PyTorch
//               computes fp32 matmuls by default), register-staged double buffering.
//
// The fp32 result tile reuses the pipeline's shared memory: SMEM_BYTES covers both, and the tile
// sits at the start of it with row pitch ZS = BN + 2 floats (even, for float2 access; the +2 keeps
// the epilogues' row and column passes free of bank conflicts).
#pragma once

#include <cstdint>

#include "ptx.cuh"

namespace vlfast {

template <typename T>
struct TileArgs {
  const T* a;            // row features, row-major
  const T* b;            // column features, row-major
  std::int64_t row0;     // first row of a in this tile
  std::int64_t col0;     // first row of b in this tile
  std::int64_t rows;     // rows of a that exist; rows at or past it read as zeros
  std::int64_t cols;     // rows of b that exist; likewise
  std::int64_t d;        // features
  std::int64_t stride_a; // elements between rows; rows start on 16-byte boundaries
  std::int64_t stride_b;
};

constexpr int cmax(int x, int y) { return x > y ? x : y; }

template <typename T>
struct MmaTile {
  static constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3, THREADS = 256;
  static constexpr int MIN_BLOCKS = 2;  // per SM, for __launch_bounds__: caps registers at 128
  static constexpr int ZS = BN + 2;
  static constexpr int CHUNKS = BK * sizeof(T) / 16;  // 16-byte chunks per row of a stage
  static constexpr int PIPE_BYTES = STAGES * (BM + BN) * BK * sizeof(T);
  static constexpr int SMEM_BYTES = cmax(PIPE_BYTES, BM * ZS * sizeof(float));
  static_assert(CHUNKS == 4, "the swizzle below is written for 64-byte stage rows");

  // Chunk c of row r is stored at chunk c ^ ((r >> 1) & 3): the 8 rows an ldmatrix reads then hit 8
  // different 16-byte bank groups.
  __device__ static int swizzle(int r, int c) { return c ^ ((r >> 1) & 3); }

  template <int ROWS>
  __device__ static void load_rows(T* dst, const T* src, std::int64_t first, std::int64_t count, std::int64_t stride,
                                   std::int64_t k0, std::int64_t d) {
    static_assert(ROWS * CHUNKS % THREADS == 0, "whole passes of the block");
    // A fixed, unrolled trip count: ptxas then needs fewer live registers than for a strided loop
    // (the codebook scan fits 128 without spills).
#pragma unroll
    for (int pass = 0; pass < ROWS * CHUNKS / THREADS; ++pass) {
      const int i = threadIdx.x + pass * THREADS;
      const int r = i / CHUNKS, c = i % CHUNKS;
      const std::int64_t row = first + r, k = k0 + c * 8;
      int bytes = 0;
      const T* from = src;  // a valid address even when nothing is read
      if (row < count && k < d) {
        bytes = static_cast<int>((d - k < 8 ? d - k : 8) * sizeof(T));
        from = src + row * stride + k;
      }
      ptx::cp_async_16(dst + r * BK + swizzle(r, c) * 8, from, bytes);
    }
  }

  // Which tile row and column accumulator element acc[mi][ni][i] of thread `tid` (this thread when
  // omitted) holds.
  __device__ static int acc_row(int mi, int i, unsigned tid) {
    return (tid >> 7) * 64 + mi * 16 + ((tid & 31) >> 2) + (i >> 1) * 8;
  }
  __device__ static int acc_col(int ni, int i, unsigned tid) {
    return ((tid >> 5) & 3) * 32 + ni * 8 + (tid & 3) * 2 + (i & 1);
  }
  __device__ static int acc_row(int mi, int i) { return acc_row(mi, i, threadIdx.x); }
  __device__ static int acc_col(int ni, int i) { return acc_col(ni, i, threadIdx.x); }

  // acc = this thread's share of the tile's inner products. Starts with a barrier (the caller's
  // previous reads of the shared memory are over) and ends with no copy in flight; a caller that
  // reuses the shared memory afterwards needs a barrier first.
  __device__ static void accumulate(const TileArgs<T>& t, char* smem, float (&acc)[4][4][4]) {
    T* sa = reinterpret_cast<T*>(smem);
    T* sb = sa + STAGES * BM * BK;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp >> 2, wn = warp & 3;  // 2 x 4 warps, each 64 rows x 32 columns
    const int ktiles = static_cast<int>((t.d + BK - 1) / BK);
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;

    auto load_stage = [&](int kt) {
      const int s = kt % STAGES;
      load_rows<BM>(sa + s * BM * BK, t.a, t.row0, t.rows, t.stride_a, std::int64_t(kt) * BK, t.d);
      load_rows<BN>(sb + s * BN * BK, t.b, t.col0, t.cols, t.stride_b, std::int64_t(kt) * BK, t.d);
    };

    __syncthreads();  // the previous tile's epilogue has finished reading the memory reused below
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < ktiles) load_stage(s);
      ptx::cp_async_commit();  // empty groups keep the wait count uniform
    }
    for (int kt = 0; kt < ktiles; ++kt) {
      ptx::cp_async_wait<STAGES - 2>();
      __syncthreads();  // stage kt is visible to all; stage kt - 1 is no longer read by anyone
      if (kt + STAGES - 1 < ktiles) load_stage(kt + STAGES - 1);
      ptx::cp_async_commit();
      const T* A = sa + (kt % STAGES) * BM * BK;
      const T* B = sb + (kt % STAGES) * BN * BK;
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        std::uint32_t bf[4][2];
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          const int r = wn * 32 + np * 16 + (lane & 7) + ((lane >> 4) << 3), c = kk * 2 + ((lane >> 3) & 1);
          std::uint32_t x[4];
          ptx::ldmatrix_x4(x, B + r * BK + swizzle(r, c) * 8);
          bf[2 * np][0] = x[0];
          bf[2 * np][1] = x[1];
          bf[2 * np + 1][0] = x[2];
          bf[2 * np + 1][1] = x[3];
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {  // one A fragment live at a time: fewer registers
          const int r = wm * 64 + mi * 16 + (lane & 15), c = kk * 2 + (lane >> 4);
          std::uint32_t af[4];
          ptx::ldmatrix_x4(af, A + r * BK + swizzle(r, c) * 8);
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) ptx::mma_16816<T>(acc[mi][ni], af, bf[ni]);
        }
      }
    }
    ptx::cp_async_wait<0>();
  }

  __device__ static void dot(const TileArgs<T>& t, char* smem) {
    float acc[4][4][4];
    accumulate(t, smem, acc);
    __syncthreads();  // every warp is done with the stages: the result tile overwrites them

    float* z = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int i = 0; i < 4; i += 2)
          *reinterpret_cast<float2*>(z + acc_row(mi, i) * ZS + acc_col(ni, i)) =
              make_float2(acc[mi][ni][i], acc[mi][ni][i + 1]);
    __syncthreads();
  }
};

struct FmaTile {
  static constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;
  static constexpr int MIN_BLOCKS = 2;
  static constexpr int ZS = BN + 2;
  static constexpr int LD = BM + 4;  // pitch of the k-major stages (16-byte aligned rows for float4 reads)
  static constexpr int PIPE_BYTES = 2 * 2 * BK * LD * sizeof(float);
  static constexpr int SMEM_BYTES = cmax(PIPE_BYTES, BM * ZS * sizeof(float));
  static_assert(BM == BN, "one loader serves both operands");

  // Four consecutive features of one row, zeros past the ends; rows are 16-byte aligned.
  __device__ static float4 load4(const float* p, std::int64_t row, std::int64_t count, std::int64_t stride,
                                 std::int64_t k, std::int64_t d) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row >= count) return v;
    const float* q = p + row * stride + k;
    if (k + 4 <= d) return *reinterpret_cast<const float4*>(q);
    if (k < d) v.x = q[0];
    if (k + 1 < d) v.y = q[1];
    if (k + 2 < d) v.z = q[2];
    return v;
  }

  __device__ static void dot(const TileArgs<float>& t, char* smem) {
    float* stage = reinterpret_cast<float*>(smem);  // [buffer][a or b][k][LD]
    const int tid = threadIdx.x;
    const int tx = tid & 15, ty = tid >> 4;          // outputs rows ty*4.., columns tx*4..
    const int lr = tid >> 2, lk = (tid & 3) * 4;      // the loader's row and first feature
    const int ktiles = static_cast<int>((t.d + BK - 1) / BK);
    float acc[4][4] = {};
    float4 ra, rb;

    auto fetch = [&](int kt) {
      const std::int64_t k = std::int64_t(kt) * BK + lk;
      ra = load4(t.a, t.row0 + lr, t.rows, t.stride_a, k, t.d);
      rb = load4(t.b, t.col0 + lr, t.cols, t.stride_b, k, t.d);
    };
    auto store = [&](int buf) {  // transposed: k-major, so the compute loop reads rows as float4
      float* sa = stage + buf * 2 * BK * LD;
      float* sb = sa + BK * LD;
      sa[(lk + 0) * LD + lr] = ra.x; sa[(lk + 1) * LD + lr] = ra.y;
      sa[(lk + 2) * LD + lr] = ra.z; sa[(lk + 3) * LD + lr] = ra.w;
      sb[(lk + 0) * LD + lr] = rb.x; sb[(lk + 1) * LD + lr] = rb.y;
      sb[(lk + 2) * LD + lr] = rb.z; sb[(lk + 3) * LD + lr] = rb.w;
    };

    __syncthreads();  // the previous tile's epilogue has finished reading the memory reused below
    fetch(0);
    store(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
      if (kt + 1 < ktiles) fetch(kt + 1);  // global loads in flight during the FMAs
      const float* sa = stage + (kt & 1) * 2 * BK * LD;
      const float* sb = sa + BK * LD;
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        const float4 x = *reinterpret_cast<const float4*>(sa + k * LD + ty * 4);
        const float4 y = *reinterpret_cast<const float4*>(sb + k * LD + tx * 4);
        const float xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xs[i], ys[j], acc[i][j]);
      }
      if (kt + 1 < ktiles) store((kt + 1) & 1);  // the other buffer: last read before the previous sync
      __syncthreads();
    }

    float* z = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float* row = z + (ty * 4 + i) * ZS + tx * 4;
      *reinterpret_cast<float2*>(row) = make_float2(acc[i][0], acc[i][1]);
      *reinterpret_cast<float2*>(row + 2) = make_float2(acc[i][2], acc[i][3]);
    }
    __syncthreads();
  }
};

// The tile each element type uses.
template <typename T>
struct TileFor {
  using type = MmaTile<T>;
};
template <>
struct TileFor<float> {
  using type = FmaTile;
};

}  // namespace vlfast
