// Element types the kernels take, as the integer codes Python passes (exposed as _C.DTYPE_CODES).
#pragma once

#include <cstddef>

namespace vlfast {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

constexpr int kNumDTypes = 3;

// The dtype for `code`, or ValueError naming the argument and the valid codes.
DType dtype_arg(const char* fn, const char* name, int code);

std::size_t dtype_size(DType t);

// torch's name for it: "float32", "float16", "bfloat16".
const char* dtype_name(DType t);

}  // namespace vlfast
