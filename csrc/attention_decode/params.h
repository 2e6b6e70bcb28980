// What the split and merge kernels of decode attention read: forward()'s arguments, checked, as one
// struct passed by value (attention_decode.h describes each field).
#pragma once

#include <cstdint>

#include "../dtype.h"

namespace vlfast::attention_decode {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxGroupRows = 128;  // query heads per kv head x sq: the rows one CTA holds
constexpr int kMaxSplits = 64;

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  float* o_part;
  float* lse_part;
  const std::int32_t* lengths;
  const std::int32_t* block_table;  // nullptr: a contiguous cache
  const std::int32_t* span_ids;     // nullptr: no spans
  const std::int8_t* key_valid;     // nullptr: every key valid
  std::int64_t batch, hq, hkv, sq, d;
  std::int64_t stride_qb, stride_qh, stride_qs;
  std::int64_t stride_kb, stride_kh, stride_ks;
  std::int64_t stride_vb, stride_vh, stride_vs;
  std::int64_t stride_ob, stride_oh, stride_os;
  std::int64_t cache_rows, page_size, max_pages, stride_bt;
  std::int64_t span_len, span_stride, valid_len, valid_stride;
  bool causal;
  std::int64_t window;
  int dalle_kind;
  std::int64_t text_len, cols, dalle_half;
  float qk_scale;  // scale * log2(e): the kernels work in base 2
  std::int64_t splits;
  bool vector_loads;  // every K / V row starts on a 16-byte boundary and d fills whole 16-byte pieces
};

// Launch the split kernel (partials) and the merge kernel (out, lse) on `stream`; `fn` names the
// Python-visible function in errors. Defined in split.cu and merge.cu.
void launch_split(const char* fn, const DecodeParams& p, DType t, std::uintptr_t stream);
void launch_merge(const char* fn, const DecodeParams& p, DType t, std::uintptr_t stream);

}  // namespace vlfast::attention_decode
