// The codebook lookup's CUDA kernels as vlfast._C exposes them, with the conventions of
// clip_loss/clip_loss.h: raw addresses (torch's data_ptr()), sizes, strides in elements, a dtype code
// (dtype.h), the device index and a cudaStream_t as an integer. Each function validates its
// arguments (ValueError / RuntimeError, see check.h), launches on the stream and returns without
// synchronising.
//
// The definition is vlfast/ops/codebook_lookup/reference.py. The scan's contract (scores, ties, the
// error of its dot products) is certify.py's, and its partial results are laid out as the Triton
// scan's (triton.py), so the same Python merges the splits and certifies the result.
#pragma once

#include <cstdint>
#include <utility>

namespace vlfast::codebook_lookup {

// (rows, codes) of the scan's tile for a dtype code: codes_per_split must be a multiple of codes.
std::pair<int, int> tile(int dtype);

// Bytes of scratch scan() needs: float32 inputs are first split into bf16 pieces for the tensor
// cores, (n + k) rows of 3d bf16 (split.h); 16-bit inputs need none (0).
std::int64_t work_bytes(std::int64_t n, std::int64_t k, std::int64_t d, int dtype);

// Rows z (n, d) against codes e (k, d), scores s_ij = alpha_j <z_i, e_j> + beta_j with alpha, beta
// (k,) float32. For codebook split s, codes [s * codes_per_split, min(k, (s + 1) * codes_per_split)),
// writes at [s * n + i] (float32, float32, int32):
//   best    the smallest score of row i,
//   index   the lowest code index with that score,
//   second  the smallest score of the split's other codes (+inf if there are none).
// 16-bit rows start on 16-byte boundaries; float32 rows need `work`: a 16-byte aligned buffer of
// `work_size` >= work_bytes(n, k, d, dtype) bytes (0 and 0 otherwise).
void scan(std::uintptr_t z, std::uintptr_t e, std::uintptr_t alpha, std::uintptr_t beta, std::uintptr_t best,
          std::uintptr_t second, std::uintptr_t index, std::uintptr_t work, std::int64_t work_size, std::int64_t n,
          std::int64_t k, std::int64_t d, std::int64_t stride_z, std::int64_t stride_e, std::int64_t codes_per_split,
          std::int64_t splits, int dtype, int device, std::uintptr_t stream);

// out[i] (float32) = the definition's distance of row i of z (n, d) to code index[i] (int64) of e
// (k, d), in float64: l2 ||z_i - e_j||^2; cosine 1 - cos, 1 where either vector is 0. An index
// outside [0, k) gives NaN instead of a read outside the codebook.
void distances(std::uintptr_t z, std::uintptr_t e, std::uintptr_t index, std::uintptr_t out, std::int64_t n,
               std::int64_t k, std::int64_t d, std::int64_t stride_z, std::int64_t stride_e, bool cosine, int dtype,
               int device, std::uintptr_t stream);

}  // namespace vlfast::codebook_lookup
