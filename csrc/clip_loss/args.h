// Argument checks that the contrastive-loss kernels share (see check.h for how they report).
#pragma once

#include <cstdint>

#include "../check.h"
#include "../dtype.h"

namespace vlfast::clip_loss {

// The feature matrices a (., d) and b (., d) of one dtype, rows 16-byte aligned; the
// scale (required) and bias (0 = none) as float32 scalars in device memory. Returns the dtype.
DType check_inputs(ArgCheck& v, int dtype, std::uintptr_t a, std::uintptr_t b, std::int64_t d,
                   std::int64_t stride_a, std::int64_t stride_b, std::uintptr_t scale, std::uintptr_t bias);

// Positives at (i, i + offset) inside an n x m block, or offset -1 for none (sigmoid only); the
// symmetric softmax needs a square block with positives on the diagonal.
void check_layout(ArgCheck& v, std::int64_t n, std::int64_t m, std::int64_t offset, bool sigmoid, bool symmetric);

// Lets `kernel` take `bytes` of dynamic shared memory (beyond the 48 KiB default); cheap, so it
// is done before each launch rather than cached per device.
void allow_smem(const char* fn, const void* kernel, int bytes);

}  // namespace vlfast::clip_loss
