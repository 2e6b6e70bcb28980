// The chosen code's distance per row, in float64 (the definition in reference.py), rounded to
// float32: one warp per row, lanes across the features, a fixed-order shuffle reduction (the result
// does not depend on the launch).
#include <cmath>
#include <string>

#include "../check.h"
#include "../dtype.cuh"
#include "../nvtx.h"
#include "../warp.cuh"
#include "codebook_lookup.h"

namespace vlfast::codebook_lookup {
namespace {

constexpr int kWarps = 8;

template <typename T, bool COSINE>
__global__ void __launch_bounds__(kWarps * 32)
    distance_kernel(const T* z, const T* e, const std::int64_t* index, float* out, std::int64_t n, std::int64_t k,
                    std::int64_t d, std::int64_t stride_z, std::int64_t stride_e) {
  const int lane = threadIdx.x & 31;
  const std::int64_t row = std::int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= n) return;
  const std::int64_t j = index[row];
  if (j < 0 || j >= k) {
    if (lane == 0) out[row] = NAN;
    return;
  }
  const T* x = z + row * stride_z;
  const T* y = e + j * stride_e;
  double acc = 0.0, xx = 0.0, yy = 0.0;  // l2: sum of squares; cosine: the dot product and both norms
  for (std::int64_t c = lane; c < d; c += 32) {
    const double a = to_float(x[c]), b = to_float(y[c]);
    if constexpr (COSINE) {
      acc = fma(a, b, acc);
      xx = fma(a, a, xx);
      yy = fma(b, b, yy);
    } else {
      acc = fma(a - b, a - b, acc);
    }
  }
  acc = warp_sum(acc);
  if constexpr (COSINE) {
    xx = warp_sum(xx);
    yy = warp_sum(yy);
    const double norms = sqrt(xx) * sqrt(yy);
    acc = norms > 0.0 ? 1.0 - acc / norms : 1.0;
  }
  if (lane == 0) out[row] = static_cast<float>(acc);
}

}  // namespace

void distances(std::uintptr_t z, std::uintptr_t e, std::uintptr_t index, std::uintptr_t out, std::int64_t n,
               std::int64_t k, std::int64_t d, std::int64_t stride_z, std::int64_t stride_e, bool cosine, int dtype,
               int device, std::uintptr_t stream) {
  static constexpr const char* fn = "vlfast._C.codebook_lookup_distances";
  ArgCheck v(fn);
  const DType t = dtype_arg(fn, "dtype", dtype);
  v.positive("n", n).positive("k", k).positive("d", d);
  v.rows("z", z, stride_z, d, dtype_size(t)).rows("e", e, stride_e, d, dtype_size(t));
  v.pointer("index", index, 8).pointer("out", out, 4);
  v.require((n + kWarps - 1) / kWarps <= 0x7fffffff, "argument 'n' is too large for one launch: " + std::to_string(n));
  v.device(device, stream);

  DeviceGuard guard(fn, device);
  NvtxRange range{"vlfast.codebook_lookup.fwd.distances"};
  const unsigned blocks = static_cast<unsigned>((n + kWarps - 1) / kWarps);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    const auto* zz = reinterpret_cast<const T*>(z);
    const auto* ee = reinterpret_cast<const T*>(e);
    const auto* ii = reinterpret_cast<const std::int64_t*>(index);
    auto* oo = reinterpret_cast<float*>(out);
    if (cosine)
      distance_kernel<T, true><<<blocks, kWarps * 32, 0, s>>>(zz, ee, ii, oo, n, k, d, stride_z, stride_e);
    else
      distance_kernel<T, false><<<blocks, kWarps * 32, 0, s>>>(zz, ee, ii, oo, n, k, d, stride_z, stride_e);
  });
  VLFAST_CHECK_LAUNCH(fn, "distance_kernel");
}

}  // namespace vlfast::codebook_lookup
