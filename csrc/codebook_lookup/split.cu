// The float32 pre-pass of the scan: split.h says what it computes and why.
#include <limits>
#include <string>

#include "codebook_lookup.h"
#include "split.h"

namespace vlfast::codebook_lookup {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;  // elements a thread splits (grid-stride): fewer, fuller blocks

__global__ void __launch_bounds__(kThreads) split_kernel(const float* src, std::int64_t rows, std::int64_t d,
                                                         std::int64_t stride, __nv_bfloat16* dst,
                                                         std::int64_t dst_stride, int lo_piece) {
  const std::int64_t total = rows * d;
  const std::int64_t step = std::int64_t(gridDim.x) * kThreads;
  for (std::int64_t i = std::int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += step) {
    const std::int64_t r = i / d, c = i - r * d;
    const float x = src[r * stride + c];
    const __nv_bfloat16 hi = __float2bfloat16_rn(x);
    const __nv_bfloat16 lo = __float2bfloat16_rn(x - __bfloat162float(hi));
    __nv_bfloat16* row = dst + r * dst_stride + c;
#pragma unroll
    for (int p = 0; p < kSplitPieces; ++p) row[p * d] = p == lo_piece ? lo : hi;
  }
}

}  // namespace

std::int64_t split_stride(std::int64_t d) { return (kSplitPieces * d + 7) / 8 * 8; }

void split_bf16x3(const char* fn, const float* src, std::int64_t rows, std::int64_t d, std::int64_t stride,
                  __nv_bfloat16* dst, int lo_piece, cudaStream_t stream) {
  const std::int64_t blocks = (rows * d + kThreads * kPerThread - 1) / (kThreads * kPerThread);
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  split_kernel<<<grid, kThreads, 0, stream>>>(src, rows, d, stride, dst, split_stride(d), lo_piece);
  VLFAST_CHECK_LAUNCH(fn, "split_kernel");
}

std::int64_t checked_work_bytes(ArgCheck& v, DType t, std::int64_t n, std::int64_t k, std::int64_t d,
                                const char* k_name) {
  v.positive("n", n).positive(k_name, k).positive("d", d);
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max() / 4;
  const std::string kn = k_name;
  v.require(d <= kMax / kSplitPieces / 8 && n <= kMax - k && n + k <= kMax / (2 * split_stride(d)),
            "arguments 'n', '" + kn + "', 'd' are too large: (n + " + kn +
                ") rows of 3d bf16 would exceed 2^61 bytes");
  if (t != DType::f32) return 0;
  return (n + k) * split_stride(d) * std::int64_t(sizeof(__nv_bfloat16));
}

std::int64_t work_bytes(std::int64_t n, std::int64_t k, std::int64_t d, int dtype) {
  static constexpr const char* fn = "vlfast._C.codebook_lookup_work_bytes";
  ArgCheck v(fn);
  return checked_work_bytes(v, dtype_arg(fn, "dtype", dtype), n, k, d);
}

}  // namespace vlfast::codebook_lookup
