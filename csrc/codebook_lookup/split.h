// float32 inputs on bf16 tensor cores (the Triton scan's bf16x3): each value x is split into
// hi = bf16(x) and lo = bf16(x - hi) (x - hi is exact in float32), leaving |x - hi - lo| <= 2^-17 |x|.
// Rows of z are stored as [hi | hi | lo] and rows of the codebook as [hi | lo | hi], so the bf16
// inner product over 3d features is hi.hi + hi.lo + lo.hi, the float32 product to within 2^-15
// relative per term (certify.py derives the bound); the scan kernel needs no fp32 variant.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../check.h"
#include "../dtype.h"

namespace vlfast::codebook_lookup {

constexpr int kSplitPieces = 3;

// Row stride, in bf16 elements, of a split matrix of d features: 3d rounded up to 16 bytes (the
// scan's vector loads).
std::int64_t split_stride(std::int64_t d);

// work_bytes() for checks made by `v` (n, k, d >= 1 and not absurdly large: ValueError naming them;
// `k_name` is the caller's name for k, "m" for similarity_topk's keys).
std::int64_t checked_work_bytes(ArgCheck& v, DType t, std::int64_t n, std::int64_t k, std::int64_t d,
                                const char* k_name = "k");

// dst (rows, 3d), row stride split_stride(d) = the pieces of src (rows, d), row stride `stride`;
// lo goes to piece `lo_piece` (2 for z, 1 for the codebook), hi to the other two. One launch.
void split_bf16x3(const char* fn, const float* src, std::int64_t rows, std::int64_t d, std::int64_t stride,
                  __nv_bfloat16* dst, int lo_piece, cudaStream_t stream);

}  // namespace vlfast::codebook_lookup
