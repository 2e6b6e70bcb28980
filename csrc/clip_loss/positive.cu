// The logit at each row's positive, z_i = scale * <a_i, b_(i + offset)> + bias: one warp per row.
#include "../check.h"
#include "../dtype.cuh"
#include "../nvtx.h"
#include "args.h"
#include "clip_loss.h"

namespace vlfast::clip_loss {
namespace {

constexpr int kWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    positive_kernel(const T* a, const T* b, const float* scale, const float* bias, float* out, std::int64_t n,
                    std::int64_t d, std::int64_t offset, std::int64_t stride_a, std::int64_t stride_b) {
  const int lane = threadIdx.x & 31;
  const std::int64_t row = std::int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= n) return;
  const T* x = a + row * stride_a;
  const T* y = b + (row + offset) * stride_b;
  float acc = 0.f;
  for (std::int64_t k = lane; k < d; k += 32) acc = fmaf(to_float(x[k]), to_float(y[k]), acc);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) out[row] = *scale * acc + (bias != nullptr ? *bias : 0.f);
}

}  // namespace

void positive(std::uintptr_t a, std::uintptr_t b, std::uintptr_t scale, std::uintptr_t bias, std::uintptr_t out,
              std::int64_t n, std::int64_t m, std::int64_t d, std::int64_t offset, std::int64_t stride_a,
              std::int64_t stride_b, int dtype, int device, std::uintptr_t stream) {
  static constexpr const char* fn = "vlfast._C.clip_loss_positive";
  ArgCheck v(fn);
  const DType t = check_inputs(v, dtype, a, b, d, stride_a, stride_b, scale, bias);
  check_layout(v, n, m, offset, /*sigmoid=*/false, /*symmetric=*/false);
  v.pointer("out", out, 4);
  v.device(device, stream);

  DeviceGuard guard(fn, device);
  NvtxRange range{"vlfast.clip_loss.fwd.positive"};
  const unsigned blocks = static_cast<unsigned>((n + kWarps - 1) / kWarps);
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    positive_kernel<T><<<blocks, kWarps * 32, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(a), reinterpret_cast<const T*>(b), reinterpret_cast<const float*>(scale),
        reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(out), n, d, offset, stride_a, stride_b);
  });
  VLFAST_CHECK_LAUNCH(fn, "positive_kernel");
}

}  // namespace vlfast::clip_loss
