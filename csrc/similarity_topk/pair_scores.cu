// The exact search's float64 scores of candidate pairs, bit for bit the definition's
// (vlfast/ops/similarity_topk/reference.py's pair_scores): one thread per pair (row_p, col_p), each
// sum taken in feature order d = 0 .. D-1 starting from the first term, every product and every sum
// rounded on its own. The arithmetic goes through __dmul_rn / __dadd_rn / __dsub_rn, which the
// compiler never contracts into fused multiply-adds (an fma rounds once: other bits), whatever
// -fmad says. Elements are read one at a time (any element-aligned rows); a pair's feature loop
// is unrolled for the loads, not reordered.
#include <climits>
#include <cmath>
#include <string>

#include "../check.h"
#include "../dtype.cuh"
#include "../nvtx.h"
#include "similarity_topk.h"

namespace vlfast::similarity_topk {
namespace {

constexpr int kThreads = 256;
constexpr int kIp = 0, kCosine = 1, kL2 = 2;  // metric codes, as similarity_topk.h lists them

// Each operation rounded separately. On the GPU the _rn intrinsics guarantee it; in the CPU emulation
// (tests/tools/cuda_emu) a volatile store keeps a host compiler from fusing the product into an add.
#ifdef __CUDA_ARCH__
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
#else
__device__ __forceinline__ double mul_rn(double a, double b) {
  volatile double r = a * b;
  return r;
}
__device__ __forceinline__ double add_rn(double a, double b) { return a + b; }
__device__ __forceinline__ double sub_rn(double a, double b) { return a - b; }
#endif

template <typename T>
__device__ __forceinline__ double to_double(T x) {
  return static_cast<double>(to_float(x));  // exact: every fp16, bf16 and fp32 value is a double
}

template <typename T>
struct PairParams {
  const T* q;
  const T* keys;
  const std::int64_t* row;  // (p,)
  const std::int64_t* col;  // (p,)
  double* out;              // (p,), cosine (3, p)
  std::int64_t p, n, m, d, stride_q, stride_k;
};

// The metric's term of feature (x, y): the product, or the squared difference for l2.
template <int METRIC>
__device__ __forceinline__ double term(double x, double y) {
  if constexpr (METRIC == kL2) {
    const double t = sub_rn(x, y);
    return mul_rn(t, t);
  } else {
    return mul_rn(x, y);
  }
}

template <typename T, int METRIC>
__global__ void __launch_bounds__(kThreads) pair_score_kernel(PairParams<T> p) {
  const std::int64_t i = std::int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.p) return;
  const std::int64_t r = p.row[i], c = p.col[i];
  if (r < 0 || r >= p.n || c < 0 || c >= p.m) {  // not a pair of these matrices: NaN sums
    p.out[i] = NAN;
    if constexpr (METRIC == kCosine) p.out[p.p + i] = p.out[2 * p.p + i] = NAN;
    return;
  }
  const T* x = p.q + r * p.stride_q;
  const T* y = p.keys + c * p.stride_k;
  double a = to_double(x[0]), b = to_double(y[0]);
  double acc = term<METRIC>(a, b);  // the first term starts each sum (0 + -0 would be +0)
  double xx = 0.0, yy = 0.0;
  if constexpr (METRIC == kCosine) {
    xx = mul_rn(a, a);
    yy = mul_rn(b, b);
  }
#pragma unroll 4
  for (std::int64_t f = 1; f < p.d; ++f) {
    a = to_double(x[f]);
    b = to_double(y[f]);
    acc = add_rn(acc, term<METRIC>(a, b));
    if constexpr (METRIC == kCosine) {
      xx = add_rn(xx, mul_rn(a, a));
      yy = add_rn(yy, mul_rn(b, b));
    }
  }
  if constexpr (METRIC == kL2) acc = -acc;
  p.out[i] = acc;
  if constexpr (METRIC == kCosine) {
    p.out[p.p + i] = xx;
    p.out[2 * p.p + i] = yy;
  }
}

template <typename T>
void launch(const PairParams<T>& p, int metric, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((p.p + kThreads - 1) / kThreads);
  switch (metric) {
    case kIp: pair_score_kernel<T, kIp><<<blocks, kThreads, 0, stream>>>(p); break;
    case kCosine: pair_score_kernel<T, kCosine><<<blocks, kThreads, 0, stream>>>(p); break;
    default: pair_score_kernel<T, kL2><<<blocks, kThreads, 0, stream>>>(p); break;
  }
}

}  // namespace

void pair_scores(std::uintptr_t q, std::uintptr_t keys, std::uintptr_t row, std::uintptr_t col, std::uintptr_t out,
                 std::int64_t p, std::int64_t n, std::int64_t m, std::int64_t d, std::int64_t stride_q,
                 std::int64_t stride_k, int metric, int dtype, int device, std::uintptr_t stream) {
  static constexpr const char* fn = "vlfast._C.similarity_topk_pair_scores";
  ArgCheck v(fn);
  const DType t = dtype_arg(fn, "dtype", dtype);
  v.require(metric == kIp || metric == kCosine || metric == kL2,
            "argument 'metric' must be a metric code: 0 (ip), 1 (cosine) or 2 (l2), got " + std::to_string(metric));
  v.positive("p", p).positive("n", n).positive("m", m).positive("d", d);
  v.rows("q", q, stride_q, d, dtype_size(t)).rows("keys", keys, stride_k, d, dtype_size(t));
  v.require(n <= LLONG_MAX / stride_q && m <= LLONG_MAX / stride_k,
            "arguments 'n', 'm' and the row strides are too large: row offsets overflow 64 bits");
  v.pointer("row", row, 8).pointer("col", col, 8).pointer("out", out, 8);
  v.require(p <= LLONG_MAX / 3 / 8, "argument 'p' is too large: " + std::to_string(p) + " pairs");
  v.require((p + kThreads - 1) / kThreads <= INT_MAX,
            "argument 'p' is too large for one launch: " + std::to_string(p) + " pairs");
  v.device(device, stream);

  DeviceGuard guard(fn, device);
  NvtxRange range{"vlfast.similarity_topk.pair_scores"};
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    const PairParams<T> params{reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(keys),
                               reinterpret_cast<const std::int64_t*>(row), reinterpret_cast<const std::int64_t*>(col),
                               reinterpret_cast<double*>(out), p, n, m, d, stride_q, stride_k};
    launch(params, metric, s);
  });
  VLFAST_CHECK_LAUNCH(fn, "pair_score_kernel");
}

}  // namespace vlfast::similarity_topk
