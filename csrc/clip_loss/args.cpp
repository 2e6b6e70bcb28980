#include "args.h"

#include <string>

namespace vlfast::clip_loss {

DType check_inputs(ArgCheck& v, int dtype, std::uintptr_t a, std::uintptr_t b, std::int64_t d,
                   std::int64_t stride_a, std::int64_t stride_b, std::uintptr_t scale, std::uintptr_t bias) {
  const DType t = dtype_arg(v.fn(), "dtype", dtype);
  v.positive("d", d);
  v.rows16("a", a, stride_a, d, dtype_size(t)).rows16("b", b, stride_b, d, dtype_size(t));
  v.pointer("scale", scale, 4).optional_pointer("bias", bias, 4);
  return t;
}

void check_layout(ArgCheck& v, std::int64_t n, std::int64_t m, std::int64_t offset, bool sigmoid, bool symmetric) {
  v.positive("n", n).positive("m", m);
  if (offset == -1) {
    v.require(sigmoid, "argument 'offset' is -1 (no positives), which only the sigmoid loss allows");
  } else {
    v.require(offset >= 0 && offset <= m - n,
              "argument 'offset' must be -1 or in [0, m - n] = [0, " + std::to_string(m - n) + "] so that the "
              "positives (i, i + offset) lie inside the " + std::to_string(n) + " x " + std::to_string(m) +
              " block, got " + std::to_string(offset));
  }
  if (symmetric) {
    v.require(!sigmoid, "argument 'symmetric' applies to the softmax loss only");
    v.require(n == m && offset == 0, "argument 'symmetric' needs a square block with positives on the diagonal, got " +
                                         std::to_string(n) + " x " + std::to_string(m) + " with offset " +
                                         std::to_string(offset));
  }
}

void allow_smem(const char* fn, const void* kernel, int bytes) {
  VLFAST_CHECK_CUDA(fn, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

}  // namespace vlfast::clip_loss
