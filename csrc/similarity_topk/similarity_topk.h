// The exact top-k similarity search's CUDA kernel as vlfast._C exposes it, with the conventions of
// codebook_lookup/codebook_lookup.h: raw addresses (torch's data_ptr()), sizes, strides in elements,
// a dtype code (dtype.h), the device index and a cudaStream_t as an integer. Each function validates
// its arguments (ValueError / RuntimeError, see check.h), launches on the stream and returns without
// synchronising.
//
// emit() is the search's candidate filter: low-precision scores, computed as the codebook scan
// computes them (so certify.py's error model holds), compared with a per-row threshold; the Python
// side (vlfast/ops/similarity_topk/) certifies the candidates and re-scores them in float64 with
// pair_scores().
#pragma once

#include <cstdint>
#include <utility>

namespace vlfast::similarity_topk {

// (rows, keys) of the filter's tile for a dtype code: keys_per_split must be a multiple of keys.
std::pair<int, int> tile(int dtype);

// Bytes of scratch emit() needs: float32 inputs are first split into bf16 pieces for the tensor
// cores, (n + m) rows of 3d bf16 (codebook_lookup/split.h); 16-bit inputs need none (0).
std::int64_t work_bytes(std::int64_t n, std::int64_t m, std::int64_t d, int dtype);

// Queries q (n, d) against keys (m, d), scores s_ij = alpha_j <q_i, k_j> + beta_j in float32 with
// alpha, beta (m,) float32. Every pair with s_ij >= threshold[i] (float32; NaN scores never qualify)
// takes slot old = atomicAdd(&count[i], 1) of row i, and when old < capacity
//   cols[i * capacity + old] = j (int32),  scores[i * capacity + old] = s_ij (float32).
// count (n,) int32 must hold zeros (the caller's job): it ends as the exact number of qualifying keys,
// past capacity too. Slots at or past min(count, capacity) are
// not written; the order of a row's slots is unspecified. Key split s covers keys
// [s * keys_per_split, min(m, (s + 1) * keys_per_split)). 16-bit rows start on 16-byte boundaries;
// float32 rows need `work`: a 16-byte aligned buffer of `work_size` >= work_bytes(n, m, d, dtype)
// bytes (0 and 0 otherwise). With capacity 0 only count is written (cols and scores may be 0).
void emit(std::uintptr_t q, std::uintptr_t keys, std::uintptr_t alpha, std::uintptr_t beta, std::uintptr_t threshold,
          std::uintptr_t count, std::uintptr_t cols, std::uintptr_t scores, std::uintptr_t work,
          std::int64_t work_size, std::int64_t n, std::int64_t m, std::int64_t d, std::int64_t stride_q,
          std::int64_t stride_k, std::int64_t capacity, std::int64_t keys_per_split, std::int64_t splits, int dtype,
          int device, std::uintptr_t stream);

// The candidates' exact scores, bit for bit reference.py's pair_scores: for pair i < p, with r = row[i],
// c = col[i] (int64), x = q[r] and y = keys[c] (q (n, d), keys (m, d), one dtype, rows element-aligned,
// unit feature stride), each float64 sum taken in order f = 0 .. d-1 from the first term, every
// product and sum rounded separately (no fused multiply-add). metric 0 (ip): out[i] = sum x_f y_f;
// 2 (l2): out[i] = -(sum (x_f - y_f)^2); 1 (cosine): out (3, p) holds the three sums
// out[i] = <x, y>, out[p + i] = |x|^2, out[2p + i] = |y|^2 (the Python side divides, with
// reference.cosine_of_sums). A pair with an index out of range gets NaN sums. out is float64.
void pair_scores(std::uintptr_t q, std::uintptr_t keys, std::uintptr_t row, std::uintptr_t col, std::uintptr_t out,
                 std::int64_t p, std::int64_t n, std::int64_t m, std::int64_t d, std::int64_t stride_q,
                 std::int64_t stride_k, int metric, int dtype, int device, std::uintptr_t stream);

}  // namespace vlfast::similarity_topk
