// The contrastive loss's CUDA kernels as vlfast._C exposes them: raw addresses (torch's data_ptr()),
// sizes, strides in elements, a dtype code (dtype.h), the device index and a cudaStream_t as an
// integer. Each function validates its arguments (ValueError / RuntimeError, see check.h), launches
// one kernel on the stream and returns without synchronising.
//
// The math is vlfast/ops/clip_loss/reference.py; the partial results follow the Triton path
// (triton.py) exactly, so the host side that combines them (partials.py) serves both.
#pragma once

#include <cstdint>
#include <utility>

namespace vlfast::clip_loss {

// (rows, columns) of the tile the stats and grad kernels use for this dtype code: the row block of
// the stats kernel's grid (column partials are per row block) and the column step that column
// splits must be a multiple of.
std::pair<int, int> tile(int dtype);

// out[i] = scale * <a_i, b_(i + offset)> + bias, float32, for i < n (the logit at each row's
// positive); b has m rows.
void positive(std::uintptr_t a, std::uintptr_t b, std::uintptr_t scale, std::uintptr_t bias, std::uintptr_t out,
              std::int64_t n, std::int64_t m, std::int64_t d, std::int64_t offset, std::int64_t stride_a, std::int64_t stride_b,
              int dtype, int device, std::uintptr_t stream);

// One pass over the logits z = scale * a @ b.T + bias on a grid of (row blocks, column splits):
//   row_part (splits, n): per split, softmax: log-sum-exp over its negatives of z_ij - pos_i
//                         (-inf when it has none); sigmoid: the sum of softplus(-t_ij z_ij);
//   col_part (row blocks, m), symmetric softmax only: per row block, log-sum-exp over its negatives
//                         of z_ij - pos_j.
// pos (n,) is positive()'s output (softmax only). Split s covers columns
// [s * cols_per_split, min(m, (s + 1) * cols_per_split)).
void stats(std::uintptr_t a, std::uintptr_t b, std::uintptr_t scale, std::uintptr_t bias, std::uintptr_t pos,
           std::uintptr_t row_part, std::uintptr_t col_part, std::int64_t n, std::int64_t m, std::int64_t d,
           std::int64_t offset, std::int64_t stride_a, std::int64_t stride_b, std::int64_t cols_per_split,
           std::int64_t splits, bool sigmoid, bool symmetric, int dtype, int device, std::uintptr_t stream);

// For rows [r0, r0 + c) (a points at row r0): g = scale * dLoss/dz in the input dtype, (c, m) with
// row stride stride_g, and per-program float32 partial sums of dLoss/dz * <a_i, b_j> (ds_part) and,
// for sigmoid, of dLoss/dz (db_part); `parts` is their length. stats (3, n) and em (2, n) =
// expm1(-stats[1:3]) come from the forward, w (n,) is the upstream gradient (halved when symmetric).
void grad(std::uintptr_t a, std::uintptr_t b, std::uintptr_t g, std::uintptr_t scale, std::uintptr_t bias,
          std::uintptr_t stats, std::uintptr_t em, std::uintptr_t w, std::uintptr_t ds_part, std::uintptr_t db_part,
          std::int64_t c, std::int64_t n, std::int64_t m, std::int64_t d, std::int64_t r0, std::int64_t offset,
          std::int64_t stride_a, std::int64_t stride_b, std::int64_t stride_g, std::int64_t parts, bool sigmoid,
          bool symmetric, int dtype, int device, std::uintptr_t stream);

}  // namespace vlfast::clip_loss
