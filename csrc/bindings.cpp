// vlfast._C: the CUDA kernels behind impl="cuda", with an interface of plain integers.
//
// Tensors arrive as their data_ptr(), sizes and strides in elements, a dtype code (DTYPE_CODES)
// and the cudaStream_t of torch.cuda.current_stream() as an integer, so the module links only the
// CUDA runtime (static) and pybind11, never libtorch: one build serves every torch version. The
// functions check their arguments and every CUDA return code; bad arguments raise ValueError, CUDA
// failures (no GPU, no driver, a failed launch) RuntimeError. Launches are asynchronous and the GIL
// is released while the checks and launches run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "attention_decode/attention_decode.h"
#include "build_info.h"
#include "clip_loss/clip_loss.h"
#include "codebook_lookup/codebook_lookup.h"
#include "dtype.h"
#include "similarity_topk/similarity_topk.h"

namespace py = pybind11;

namespace {

py::dict build_info_dict() {
  const vlfast::BuildInfo info = vlfast::build_info();
  py::dict d;
  d["archs"] = info.archs;
  d["arch_list"] = info.arch_list;
  d["cuda"] = info.cuda;
  d["nvcc"] = info.nvcc;
  d["host_compiler"] = info.host_compiler;
  d["build_type"] = info.build_type;
  d["cudart"] = "static";
  d["runtime_version"] = info.runtime_version;
  d["nvtx"] = "NVTX3 (domain 'vlfast')";
  return d;
}

void bind_clip_loss(py::module_& m) {
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("clip_loss_tile", &vlfast::clip_loss::tile, arg("dtype"),
        "(rows, columns) of the contrastive-loss kernels' tile for a dtype code.");
  m.def("clip_loss_positive", &vlfast::clip_loss::positive, arg("a"), arg("b"), arg("scale"), arg("bias"),
        arg("out"), arg("n"), arg("m"), arg("d"), arg("offset"), arg("stride_a"), arg("stride_b"), arg("dtype"),
        arg("device"), arg("stream"), nogil,
        "out[i] = scale * <a_i, b_(i + offset)> + bias (float32), the logit at each row's positive.");
  m.def("clip_loss_stats", &vlfast::clip_loss::stats, arg("a"), arg("b"), arg("scale"), arg("bias"), arg("pos"),
        arg("row_part"), arg("col_part"), arg("n"), arg("m"), arg("d"), arg("offset"), arg("stride_a"),
        arg("stride_b"), arg("cols_per_split"), arg("splits"), arg("sigmoid"), arg("symmetric"), arg("dtype"),
        arg("device"), arg("stream"), nogil,
        "Row partials (splits, n) and per-row-block column partials (row blocks, m) of the contrastive loss.");
  m.def("clip_loss_grad", &vlfast::clip_loss::grad, arg("a"), arg("b"), arg("g"), arg("scale"), arg("bias"),
        arg("stats"), arg("em"), arg("w"), arg("ds_part"), arg("db_part"), arg("c"), arg("n"), arg("m"), arg("d"),
        arg("r0"), arg("offset"), arg("stride_a"), arg("stride_b"), arg("stride_g"), arg("parts"), arg("sigmoid"),
        arg("symmetric"), arg("dtype"), arg("device"), arg("stream"), nogil,
        "G = scale * dLoss/dz for a chunk of rows, and partial sums for d_scale and d_bias.");
}

void bind_codebook_lookup(py::module_& m) {
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("codebook_lookup_tile", &vlfast::codebook_lookup::tile, arg("dtype"),
        "(rows, codes) of the codebook scan's tile for a dtype code; codes_per_split is a multiple of codes.");
  m.def("codebook_lookup_work_bytes", &vlfast::codebook_lookup::work_bytes, arg("n"), arg("k"), arg("d"),
        arg("dtype"), "Bytes of scratch codebook_lookup_scan needs (float32: its bf16 pieces; else 0).");
  m.def("codebook_lookup_scan", &vlfast::codebook_lookup::scan, arg("z"), arg("e"), arg("alpha"), arg("beta"),
        arg("best"), arg("second"), arg("index"), arg("work"), arg("work_size"), arg("n"), arg("k"), arg("d"),
        arg("stride_z"), arg("stride_e"), arg("codes_per_split"), arg("splits"), arg("dtype"), arg("device"),
        arg("stream"), nogil,
        "Per (codebook split, row): the best score alpha_j <z_i, e_j> + beta_j, its lowest index, the second best.");
  m.def("codebook_lookup_distances", &vlfast::codebook_lookup::distances, arg("z"), arg("e"), arg("index"),
        arg("out"), arg("n"), arg("k"), arg("d"), arg("stride_z"), arg("stride_e"), arg("cosine"), arg("dtype"),
        arg("device"), arg("stream"), nogil,
        "out[i] = the float64 distance of row i to code index[i], rounded to float32.");
}

void bind_attention_decode(py::module_& m) {
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("attention_decode_forward", &vlfast::attention_decode::forward, arg("q"), arg("k"), arg("v"), arg("out"),
        arg("lse"), arg("o_part"), arg("lse_part"), arg("lengths"), arg("block_table"), arg("span_ids"),
        arg("key_valid"), arg("batch"), arg("hq"), arg("hkv"), arg("sq"), arg("d"), arg("stride_qb"),
        arg("stride_qh"), arg("stride_qs"), arg("stride_kb"), arg("stride_kh"), arg("stride_ks"), arg("stride_vb"),
        arg("stride_vh"), arg("stride_vs"), arg("stride_ob"), arg("stride_oh"), arg("stride_os"),
        arg("cache_rows"), arg("page_size"), arg("max_pages"), arg("stride_bt"), arg("span_len"),
        arg("span_stride"), arg("valid_len"), arg("valid_stride"), arg("causal"), arg("window"),
        arg("dalle_kind"), arg("text_len"), arg("cols"), arg("dalle_half"), arg("scale"), arg("splits"),
        arg("dtype"), arg("device"), arg("stream"), nogil,
        "Decode attention of sq queries per row against a contiguous or paged KV cache: split-K partials, "
        "then their merge into out and the natural-log lse.");
}

void bind_similarity_topk(py::module_& m) {
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("similarity_topk_tile", &vlfast::similarity_topk::tile, arg("dtype"),
        "(rows, keys) of the candidate filter's tile for a dtype code; keys_per_split is a multiple of keys.");
  m.def("similarity_topk_work_bytes", &vlfast::similarity_topk::work_bytes, arg("n"), arg("m"), arg("d"),
        arg("dtype"), "Bytes of scratch similarity_topk_emit needs (float32: its bf16 pieces; else 0).");
  m.def("similarity_topk_emit", &vlfast::similarity_topk::emit, arg("q"), arg("keys"), arg("alpha"), arg("beta"),
        arg("threshold"), arg("count"), arg("cols"), arg("scores"), arg("work"), arg("work_size"), arg("n"),
        arg("m"), arg("d"), arg("stride_q"), arg("stride_k"), arg("capacity"), arg("keys_per_split"),
        arg("splits"), arg("dtype"), arg("device"), arg("stream"), nogil,
        "Every pair with alpha_j <q_i, k_j> + beta_j >= threshold_i (float32) takes slot old = count[i]++ of "
        "row i and, when old < capacity, writes its key and score there.");
  m.def("similarity_topk_pair_scores", &vlfast::similarity_topk::pair_scores, arg("q"), arg("keys"), arg("row"),
        arg("col"), arg("out"), arg("p"), arg("n"), arg("m"), arg("d"), arg("stride_q"), arg("stride_k"),
        arg("metric"), arg("dtype"), arg("device"), arg("stream"), nogil,
        "The float64 scores of pairs (q[row[i]], keys[col[i]]), bit for bit the definition's ordered sums "
        "(metric 0 ip, 2 l2: out (p,); 1 cosine: out (3, p) = <q, k>, |q|^2, |k|^2).");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlfast's CUDA kernels (see csrc/); an ABI-free interface of integers";
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = static_cast<int>(vlfast::DType::f32),
                                   py::arg("float16") = static_cast<int>(vlfast::DType::f16),
                                   py::arg("bfloat16") = static_cast<int>(vlfast::DType::bf16));
  // The ops that have kernels here; vlfast._backends reads it. Add an op's name with its bindings.
  m.attr("OPS") = py::make_tuple("clip_loss", "codebook_lookup", "attention_decode", "similarity_topk");
  m.def("build_info", &build_info_dict, "What this module was built with: archs, CUDA, compilers.");
  bind_clip_loss(m);
  bind_codebook_lookup(m);
  bind_attention_decode(m);
  bind_similarity_topk(m);
}
