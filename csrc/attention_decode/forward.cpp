// forward(): the argument checks of decode attention, then the split and merge launches.
#include <cmath>
#include <string>

#include "../check.h"
#include "../dtype.h"
#include "attention_decode.h"
#include "params.h"

namespace vlfast::attention_decode {
namespace {

std::string str(std::int64_t x) { return std::to_string(x); }

void non_negative(ArgCheck& v, const char* name, std::int64_t x) {
  v.require(x >= 0, std::string("argument '") + name + "' must be >= 0, got " + str(x));
}

}  // namespace

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
             std::uintptr_t stream) {
  static constexpr const char* fn = "vlfast._C.attention_decode_forward";
  ArgCheck c(fn);
  const DType t = dtype_arg(fn, "dtype", dtype);
  const std::size_t elem = dtype_size(t);
  c.positive("batch", batch).positive("hq", hq).positive("hkv", hkv).positive("sq", sq).positive("d", d);
  c.require(d <= kMaxHeadDim, "argument 'd' (head dim) must be <= " + str(kMaxHeadDim) + ", got " + str(d));
  c.require(hq % hkv == 0, "argument 'hq' (" + str(hq) + ") must be a multiple of 'hkv' (" + str(hkv) + ")");
  c.require(hq / hkv * sq <= kMaxGroupRows, "the query rows per kv head, hq / hkv x sq = " + str(hq / hkv * sq) +
                                                ", must be <= " + str(kMaxGroupRows));
  c.require(splits >= 1 && splits <= kMaxSplits,
            "argument 'splits' must be in [1, " + str(kMaxSplits) + "], got " + str(splits));
  c.require(batch * hkv <= 0x7fffffff && (batch * hq * sq + 7) / 8 <= 0x7fffffff,
            "arguments 'batch', 'hq', 'hkv' and 'sq' are too large for one launch");
  c.positive("cache_rows", cache_rows).positive("page_size", page_size);
  non_negative(c, "max_pages", max_pages);
  for (const auto& [name, x] : {std::pair<const char*, std::int64_t>{"stride_qb", stride_qb}, {"stride_qh", stride_qh},
                                {"stride_qs", stride_qs}, {"stride_kb", stride_kb}, {"stride_kh", stride_kh},
                                {"stride_ks", stride_ks}, {"stride_vb", stride_vb}, {"stride_vh", stride_vh},
                                {"stride_vs", stride_vs}, {"stride_ob", stride_ob}, {"stride_oh", stride_oh},
                                {"stride_os", stride_os}, {"stride_bt", stride_bt}})
    non_negative(c, name, x);
  c.pointer("q", q, elem).pointer("k", k, elem).pointer("v", v, elem).pointer("out", out, elem);
  c.pointer("lse", lse, 4).pointer("o_part", o_part, 4).pointer("lse_part", lse_part, 4);
  c.pointer("lengths", lengths, 4);
  if (max_pages > 0) {
    c.pointer("block_table", block_table, 4);
    c.require(stride_bt >= max_pages, "argument 'stride_bt' (" + str(stride_bt) + ") must be >= 'max_pages' (" +
                                          str(max_pages) + ")");
  } else {
    c.require(block_table == 0, "argument 'block_table' must be 0 for a contiguous cache (max_pages = 0)");
    c.require(cache_rows == batch, "a contiguous cache holds one row per batch row: 'cache_rows' (" +
                                       str(cache_rows) + ") must equal 'batch' (" + str(batch) + ")");
  }
  c.optional_pointer("span_ids", span_ids, 4).optional_pointer("key_valid", key_valid, 1);
  if (span_ids != 0) {
    c.positive("span_len", span_len);
    non_negative(c, "span_stride", span_stride);
  }
  if (key_valid != 0) {
    c.positive("valid_len", valid_len);
    non_negative(c, "valid_stride", valid_stride);
  }
  non_negative(c, "window", window);
  c.require(dalle_kind >= 0 && dalle_kind <= 3,
            "argument 'dalle_kind' must be 0 (none), 1 (row), 2 (column) or 3 (conv), got " + str(dalle_kind));
  if (dalle_kind != 0) {
    c.positive("cols", cols);
    non_negative(c, "text_len", text_len);
    non_negative(c, "dalle_half", dalle_half);
  }
  c.require(std::isfinite(scale), "argument 'scale' must be finite");
  c.device(device, stream);

  DecodeParams p{};
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  p.o_part = reinterpret_cast<float*>(o_part);
  p.lse_part = reinterpret_cast<float*>(lse_part);
  p.lengths = reinterpret_cast<const std::int32_t*>(lengths);
  p.block_table = max_pages > 0 ? reinterpret_cast<const std::int32_t*>(block_table) : nullptr;
  p.span_ids = reinterpret_cast<const std::int32_t*>(span_ids);
  p.key_valid = reinterpret_cast<const std::int8_t*>(key_valid);
  p.batch = batch, p.hq = hq, p.hkv = hkv, p.sq = sq, p.d = d;
  p.stride_qb = stride_qb, p.stride_qh = stride_qh, p.stride_qs = stride_qs;
  p.stride_kb = stride_kb, p.stride_kh = stride_kh, p.stride_ks = stride_ks;
  p.stride_vb = stride_vb, p.stride_vh = stride_vh, p.stride_vs = stride_vs;
  p.stride_ob = stride_ob, p.stride_oh = stride_oh, p.stride_os = stride_os;
  p.cache_rows = cache_rows, p.page_size = page_size, p.max_pages = max_pages, p.stride_bt = stride_bt;
  p.span_len = span_len, p.span_stride = span_stride, p.valid_len = valid_len, p.valid_stride = valid_stride;
  p.causal = causal, p.window = window, p.dalle_kind = dalle_kind;
  p.text_len = text_len, p.cols = cols, p.dalle_half = dalle_half;
  p.qk_scale = static_cast<float>(scale * 1.4426950408889634);
  p.splits = splits;
  const auto whole_16 = [&](std::int64_t x) { return (x * static_cast<std::int64_t>(elem)) % 16 == 0; };
  p.vector_loads = k % 16 == 0 && v % 16 == 0 && whole_16(d) && whole_16(stride_kb) && whole_16(stride_kh) &&
                   whole_16(stride_ks) && whole_16(stride_vb) && whole_16(stride_vh) && whole_16(stride_vs);

  DeviceGuard guard(fn, device);
  launch_split(fn, p, t, stream);
  launch_merge(fn, p, t, stream);
}

}  // namespace vlfast::attention_decode
