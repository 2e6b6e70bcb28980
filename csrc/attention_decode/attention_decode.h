// Decode attention's CUDA kernels as vlfast._C exposes them, with the conventions of
// codebook_lookup/codebook_lookup.h: raw addresses (torch's data_ptr()), sizes, strides in elements,
// a dtype code (dtype.h), the device index and a cudaStream_t as an integer. forward() validates its
// arguments (ValueError / RuntimeError, see check.h), launches on the stream and returns without
// synchronising.
//
// The definition is vlfast/ops/attention_decode/reference.py; the algorithm is the Triton kernel's
// (triton.py): split-K over each row's keys, then a merge of the splits.
#pragma once

#include <cstdint>

namespace vlfast::attention_decode {

// Attention of the sq newest queries of each row against its first L_b = lengths[b] cached keys.
//
// q (batch, hq, sq, d) and out (same shape, q's dtype) with strides (stride_qb, stride_qh, stride_qs)
// and (stride_ob, stride_oh, stride_os), unit head_dim stride. lse (batch, hq, sq) float32,
// contiguous: the natural-log log-sum-exp (-inf for a query that keeps no key, whose output is 0).
//
// The caches: rows of d elements addressed as cache + page * stride_kb + head * stride_kh + slot *
// stride_ks (k) and likewise for v. Contiguous (max_pages = 0, block_table = 0): page = b, slot = the
// position, page_size = S_max, cache_rows = batch. Paged (max_pages >= 1): page =
// block_table[b * stride_bt + position / page_size] (int32), slot = position % page_size, cache_rows =
// the number of pages. A row whose length is outside [0, capacity], or whose page index is outside
// [0, cache_rows), gives NaN instead of a read outside the cache.
//
// The mask (vlfast.masks.Mask.allowed at cache positions, query i of row b at L_b - sq + i):
// causal; span_ids (int32, span_len positions per row, span_stride 0 for one row of ids shared by
// the batch; 0 = none); window (0 = none); dalle_kind 0 (none), 1 row, 2 column, 3 conv with
// text_len, cols and dalle_half = kernel / 2; key_valid (int8, valid_len positions per row,
// valid_stride; 0 = none). Positions past span_len / valid_len are outside every span / not valid.
//
// Scratch: o_part (batch, hq, sq, splits, d) and lse_part (batch, hq, sq, splits), float32,
// contiguous. scale multiplies the scores (softmax(scale * q k^T)).
void forward(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, std::uintptr_t lse,
             std::uintptr_t o_part, std::uintptr_t lse_part, std::uintptr_t lengths, std::uintptr_t block_table,
             std::uintptr_t span_ids, std::uintptr_t key_valid, std::int64_t batch, std::int64_t hq, std::int64_t hkv,
             std::int64_t sq, std::int64_t d, std::int64_t stride_qb, std::int64_t stride_qh, std::int64_t stride_qs,
             std::int64_t stride_kb, std::int64_t stride_kh, std::int64_t stride_ks, std::int64_t stride_vb,
             std::int64_t stride_vh, std::int64_t stride_vs, std::int64_t stride_ob, std::int64_t stride_oh,
             std::int64_t stride_os, std::int64_t cache_rows, std::int64_t page_size, std::int64_t max_pages,
             std::int64_t stride_bt, std::int64_t span_len, std::int64_t span_stride, std::int64_t valid_len,
             std::int64_t valid_stride, bool causal, std::int64_t window, int dalle_kind, std::int64_t text_len,
             std::int64_t cols, std::int64_t dalle_half, double scale, std::int64_t splits, int dtype, int device,
             std::uintptr_t stream);

}  // namespace vlfast::attention_decode
