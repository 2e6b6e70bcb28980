"""Compile a Triton kernel for a GPU architecture on a machine without one, and read off what the
code generator did: shared memory, registers and spills (ptxas -v), tensor-core and async-copy use.

The compile tests use it to catch what the interpreter cannot (lowering failures, no tensor cores,
no pipelining); by hand, `python -m tests.tools.triton_aot` prints the table for vlfast's kernels.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Arguments the JIT sees 16-divisible at real launches (aligned pointers; strides of rows of
# 8+ half-precision elements), which is what lets it vectorise loads and pipeline them.
ALIGNED_INTS = ("stride_a", "stride_b", "stride_g", "stride_z", "stride_e", "stride_h")


@dataclass
class CompiledInfo:
    shared_bytes: int
    registers: Optional[int]
    spill_bytes: Optional[int]
    wgmma: int         # Hopper warpgroup MMAs
    mma_sync: int      # Ampere-style MMAs
    async_copies: int  # cp.async: global loads pipelined into shared memory
    tma: int = 0       # cp.async.bulk.tensor: TMA copies (Hopper)


def jit_function(kernel):
    """The @triton.jit function under any @autotune / @heuristics wrappers."""
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def signature(kernel, dtypes: dict) -> dict:
    """Arg name -> Triton type for an ahead-of-time compile: pointers are fp32 unless named in
    `dtypes` (e.g. {"a_ptr": "bf16"}) and 16-aligned; ints i32; constexprs as such."""
    fn = jit_function(kernel)
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtypes.get(name, 'fp32')}:16"
        else:
            sig[name] = "i32:16" if name in ALIGNED_INTS else "i32"
    return sig


def _ptxas() -> Optional[Path]:
    import triton
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):  # the newest first: it reads the newest PTX
        if (bin_dir / name).exists():
            return bin_dir / name
    return None


def compile_kernel(kernel, sig: dict, constexprs: dict, capability: int = 90, num_warps: int = 8,
                   num_stages: int = 3) -> CompiledInfo:
    """sig: arg name -> Triton type; a ":16" suffix adds the 16-divisibility hint."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_function(kernel)
    types, attrs = {}, {}
    for name, kind in sig.items():
        base, _, hint = kind.partition(":")
        types[name] = base
        if hint == "16":
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, types, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    regs = spills = None
    ptxas = _ptxas()
    if ptxas is not None:
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "kernel.ptx"
            path.write_text(ptx)
            report = subprocess.run([str(ptxas), f"-arch={arch}", "-v", str(path), "-o", str(path.with_suffix(".o"))],
                                    capture_output=True, text=True).stderr
        m = re.search(r"Used (\d+) registers", report)
        regs = int(m.group(1)) if m else None
        spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", report))
    tma = ptx.count("cp.async.bulk.tensor")
    return CompiledInfo(compiled.metadata.shared, regs, spills, ptx.count("wgmma.mma_async"),
                        ptx.count("mma.sync"), ptx.count("cp.async") - tma, tma)


ROOT = Path(__file__).resolve().parents[2]


def child_env() -> dict:
    """The environment for a child process that compiles: TRITON_INTERPRET unset (the interpreter, on
    in a CPU test session, replaces @triton.jit functions) and the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def compile_in_child(*args: str) -> list:
    """The rows of `python -m tests.tools.triton_aot --json *args`, compiled in a child process."""
    out = subprocess.run([sys.executable, "-m", "tests.tools.triton_aot", "--json", *args], env=child_env(),
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _listed(configs, key, all_configs: bool) -> list:
    """A kernel's configs for a key (vlfast/_launch_configs.py): the default, or every candidate."""
    found = configs.candidates(key)
    return found if all_configs else found[:1]


LAYOUTS = {"softmax-sym": (False, True, True), "softmax-rows": (False, False, True),
           "sigmoid": (True, False, True), "sigmoid-neg": (True, False, False)}


def clip_loss_variants(all_configs: bool = False):
    """(label, kernel, signature, constexprs, config) for the contrastive-loss kernels: every layout
    and input dtype (fp32 both exact and as TF32; fp16 through the masked-K path of odd D), on the
    family's default config or on all of them."""
    import torch
    from vlfast.ops.clip_loss import triton as K
    dtypes = (("bf16", "tf32", True), ("fp16", "tf32", False), ("fp32", "tf32", True), ("fp32", "ieee", True))
    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for kernel, name, configs in ((K._logit_stats_kernel, "stats", K.STATS_CONFIGS),
                                  (K._logit_grad_kernel, "grad", K.GRAD_CONFIGS)):
        for layout, (sigmoid, symmetric, has_pos) in LAYOUTS.items():
            for dtype, precision, even_k in dtypes:
                key = K.launch_key(torch_dtypes[dtype], 64 if even_k else 100, "sigmoid" if sigmoid else "softmax",
                                   symmetric, precision)
                for config in _listed(configs, key, all_configs):
                    consts = dict(SIGMOID=sigmoid, SYMMETRIC=symmetric, HAS_BIAS=sigmoid, HAS_POS=has_pos,
                                  DOT_PRECISION=precision, UPCAST=False, EVEN_K=even_k, **config.kwargs)
                    sig = signature(kernel, {"a_ptr": dtype, "b_ptr": dtype, "g_ptr": dtype})
                    label = f"{name} {layout} {dtype}-{precision}" + ("" if even_k else "-maskedK")
                    yield label, kernel, sig, consts, config
    yield ("positive bf16", K._positive_logit_kernel, signature(K._positive_logit_kernel, {"a_ptr": "bf16", "b_ptr": "bf16"}),
           {"HAS_BIAS": True, "BR": 64, "BD": 64}, None)


def linear_cross_entropy_variants(all_configs: bool = False):
    """The row kernel of the fused linear cross-entropy: statistics + gradient, gradient only."""
    from vlfast.ops.linear_cross_entropy import triton as K
    from vlfast.ops.linear_cross_entropy import weight_grad as W
    kernel = K._ce_rows_kernel
    for dtype in ("bf16", "fp32"):
        for stats, label in ((True, "fwd"), (False, "bwd")):
            for config in _listed(K.ROW_CONFIGS, (), all_configs):
                consts = dict(HAS_BIAS=True, SOFTCAP=True, COMPUTE_STATS=stats, WRITE_GRAD=True, **config.kwargs)
                sig = signature(kernel, {"g_ptr": dtype, "bias_ptr": dtype, "targets_ptr": "i64"})
                yield f"ce_rows {label} {dtype}", kernel, sig, consts, config
    for dtype in ("bf16", "fp16"):  # the d_weight accumulator: a GEMM tile (G^T @ hidden) per program
        for config in _listed(W.GEMM_CONFIGS, (), all_configs):
            sig = signature(W._accumulate_kernel, {"acc_ptr": "fp16", "g_ptr": dtype, "h_ptr": dtype})
            sig["V"] = sig["H"] = "i32:16"  # the goal's 32064 x 4096: 16-divisible rows vectorise
            yield f"dw_acc {dtype}", W._accumulate_kernel, sig, dict(UPCAST=False, FIRST=False, **config.kwargs), config
    for config in _listed(W.FINISH_CONFIGS, (), all_configs):
        yield ("dw_finish bf16", W._finish_kernel, signature(W._finish_kernel, {"acc_ptr": "fp16"}),
               dict(TO_BF16=True, **config.kwargs), config)


# The codebook scan's (input dtype, feature dims): one of each config family (test_launch_configs checks).
CODEBOOK_DIMS = (("bf16", (8, 100, 256, 512)), ("fp16", (64,)), ("fp32", (64, 256)))


def _feature_tiled(kernel, configs, launch_key, label: str, pointers: dict, all_configs: bool):
    """Variants of a kernel on the codebook scan's main loop (row_block / dot_tile: BK, NUM_K, EVEN_K
    from D) for each dtype and D of CODEBOOK_DIMS; pointers names the pointers typed by the inputs'
    dtype ("in") or fixed ones (e.g. "i32")."""
    import torch
    import triton
    from vlfast.ops.codebook_lookup import triton as scan
    for dtype, dims in CODEBOOK_DIMS:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        sig = signature(kernel, {name: dtype if kind == "in" else kind for name, kind in pointers.items()})
        for d in dims:
            for config in _listed(configs, launch_key(torch_dtype, d), all_configs):
                bk = scan._block_k({**config.kwargs, "D": d})
                consts = dict(D=d, DOT_PRECISION=scan.dot_precision(torch_dtype), UPCAST=False, BK=bk,
                              NUM_K=triton.cdiv(d, bk), EVEN_K=d % bk == 0, **config.kwargs)
                yield f"{label} {dtype} D{d}", kernel, sig, consts, config


def codebook_lookup_variants(all_configs: bool = False):
    """The codebook scan for each config family (D = 8: narrow rows; 100: masked features; 256: a
    resident row block; 512: a pipelined feature loop) and input width, and the distance kernel."""
    import triton
    from vlfast.ops.codebook_lookup import triton as K
    yield from _feature_tiled(K._scan_kernel, K.SCAN_CONFIGS, K.launch_key, "scan",
                              {"z_ptr": "in", "e_ptr": "in", "index_ptr": "i32"}, all_configs)
    for dtype, cosine in (("bf16", False), ("fp32", True)):
        sig = signature(K._distance_kernel, {"z_ptr": dtype, "e_ptr": dtype, "index_ptr": "i64"})
        yield (f"distance {dtype} {'cosine' if cosine else 'l2'}", K._distance_kernel, sig,
               {"COSINE": cosine, "BR": 64, "BD": 64}, triton.Config({}, num_warps=4, num_stages=1))


def similarity_topk_variants(all_configs: bool = False):
    """The emit kernel on the codebook scan's config families (the same dims: narrow, masked, resident
    and pipelined features; bf16x3 for fp32), with a row-wide ballot and atomics in its epilogue; and
    the float64 pair-score kernel for each metric."""
    import triton
    from vlfast.ops.similarity_topk import triton as K
    yield from _feature_tiled(K._emit_kernel, K.EMIT_CONFIGS, K.launch_key, "emit",
                              {"q_ptr": "in", "k_ptr": "in", "count_ptr": "i32", "cols_ptr": "i32"}, all_configs)
    for dtype, metric in (("bf16", "ip"), ("fp32", "cosine"), ("fp16", "l2")):  # the float64 pair scores
        sig = signature(K._pair_score_kernel, {"q_ptr": dtype, "k_ptr": dtype, "row_ptr": "i64", "col_ptr": "i64",
                                               "out_ptr": "fp64"})
        yield (f"pair-score {dtype} {metric}", K._pair_score_kernel, sig,
               {"METRIC": K._METRIC_CODES[metric], "BP": 128}, triton.Config({}, num_warps=4, num_stages=1))


# Attention's head dims for every candidate: one per BLOCK_D family (64, 128, 256), and 96 for the
# head dims between 64 and 128, whose defaults differ from 128's (test_attention_tuning checks).
ATTENTION_HEAD_DIMS = (64, 96, 128, 256)


def attention_variants(all_configs: bool = False):
    """Forward, dQ and dK/dV kernels on their default configs (tuning.py): head dims 64 / 128 / 256 in
    bf16, block-mapped masks, the packed layout. With all_configs, also every candidate config of
    tuning.py on the causal mask: bf16, and float32 both as TF32 and exact, at head dims 64, 96 (the
    head dims between 64 and 128, whose defaults differ from 128's), 128 and 256."""
    import torch
    import triton
    from vlfast.ops.attention import triton as K
    from vlfast.ops.attention import tuning
    base = dict(SPANS=False, WINDOW=False, DALLE=0, KEY_VALID=False, PERMUTED=False)
    masks = {"causal": {**base, "CAUSAL": True, "HAS_MAP": False},
             "spans": {**base, "CAUSAL": True, "SPANS": True, "HAS_MAP": True},
             "none": {**base, "CAUSAL": False, "HAS_MAP": False},
             "dalle-column": {**base, "CAUSAL": True, "DALLE": 2, "HAS_MAP": True, "PERMUTED": True}}
    kernels = {"fwd": (("fwd", K._attn_fwd),), "bwd": (("dq", K._attn_bwd_dq), ("dkdv", K._attn_bwd_dkdv))}
    tensors = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")

    def variant(name, kernel, d, dtype, precision, mask_name, varlen, config, label):
        block_d = max(16, triton.next_power_of_2(d))
        consts = dict(HEAD_DIM=d, BLOCK_D=block_d, BM=config.bm, BN=config.bn,
                      VARLEN=varlen, MAP_PER_BATCH=False, UPCAST=False, PRECISION=precision, **masks[mask_name])
        consts["TMA"] = config.tma
        rows = config.bm if name == "dkdv" else config.bn  # dK/dV reads Q and dO tiles; the others K, V
        sig = signature(kernel, {})
        for arg in sig:
            if arg in ("k_desc", "v_desc", "a_desc", "b_desc"):  # host-side TMA descriptors; else unused
                sig[arg] = f"tensordesc<{dtype}[1,1,{rows},{block_d}]>" if config.tma else f"*{dtype}:16"
            elif arg in tensors:
                sig[arg] = f"*{dtype}:16"
            elif arg in ("LSE2", "DELTA"):
                sig[arg] = "*fp32:16"
            elif arg in ("cu_q", "cu_k", "map_idx", "map_cnt", "span_ptr", "pos_ptr"):
                sig[arg] = "*i32:16"
            elif arg in ("map_full", "valid_ptr"):
                sig[arg] = "*i8:16"
            elif arg.startswith("stride_") and sig[arg] == "i32":  # multiples of D in (B, H, S, D) tensors
                sig[arg] = "i32:16"
        cfg = triton.Config({"BM": config.bm, "BN": config.bn}, num_warps=config.num_warps,
                            num_stages=config.num_stages)
        return f"attn {name}{'-tma' if config.tma else ''} {label}", kernel, sig, consts, cfg

    for d, mask_name, varlen in ((128, "causal", False), (64, "none", False), (128, "spans", False),
                                 (64, "causal", True), (256, "causal", False), (64, "dalle-column", False)):
        for pass_, pass_kernels in kernels.items():
            config = tuning.default_config(d, torch.bfloat16, pass_)
            for name, kernel in pass_kernels:
                yield variant(name, kernel, d, "bf16", "tf32", mask_name, varlen, config,
                              f"d{d} {mask_name}{' varlen' if varlen else ''}")
    for d in (64, 128, 256):  # the TMA candidates, on the causal mask
        for pass_, pass_kernels in kernels.items():
            for config in tuning.candidates(d, torch.bfloat16, pass_):
                for name, kernel in pass_kernels if config.tma else ():
                    yield variant(name, kernel, d, "bf16", "tf32", "causal", False, config, f"d{d} causal {config}")
    if not all_configs:
        return
    for torch_dtype, dtype, precision in ((torch.bfloat16, "bf16", "tf32"), (torch.float32, "fp32", "tf32"),
                                          (torch.float32, "fp32", "ieee")):
        for d in ATTENTION_HEAD_DIMS:
            for pass_, pass_kernels in kernels.items():
                for config in tuning.candidates(d, torch_dtype, pass_):
                    for name, kernel in pass_kernels:
                        yield variant(name, kernel, d, dtype, precision, "causal", False, config,
                                      f"d{d} {dtype}-{precision} {config}")


def attention_decode_variants(all_configs: bool = False):
    """The split kernel at head dims 64 / 128 / 256 in bf16 (fp16 at 80: a masked head dim), contiguous
    and paged caches, GQA groups of 1 to 128 query rows, with and without masks; and the merge."""
    import triton
    from vlfast.ops.attention_decode import triton as K
    no_mask = dict(CAUSAL=False, SPANS=False, WINDOW=False, DALLE=0, KEY_VALID=False)
    cases = (("bf16", 128, 4, 1, False, "none"), ("bf16", 128, 4, 1, True, "none"), ("bf16", 64, 8, 16, False, "causal"),
             ("bf16", 256, 1, 1, True, "causal"), ("fp16", 80, 2, 3, False, "dalle-row"),
             ("bf16", 128, 1, 1, False, "spans+padding"))
    masks = {"none": no_mask, "causal": {**no_mask, "CAUSAL": True}, "dalle-row": {**no_mask, "CAUSAL": True, "DALLE": 1},
             "spans+padding": {**no_mask, "CAUSAL": True, "SPANS": True, "KEY_VALID": True}}
    for dtype, d, group, sq, paged, mask in cases:
        block_d = max(16, triton.next_power_of_2(d))
        bm = max(16, triton.next_power_of_2(group * sq))
        sig = signature(K._decode_split, {})
        for arg in sig:
            if arg in ("Q", "K", "V"):
                sig[arg] = f"*{dtype}:16"
            elif arg in ("O_part", "LSE_part"):
                sig[arg] = "*fp32:16"
            elif arg in ("lengths", "block_table", "span_ptr"):
                sig[arg] = "*i32:16"
            elif arg == "valid_ptr":
                sig[arg] = "*i8:16"
            elif arg.startswith("stride_") and arg != "stride_bt" and d % 16 == 0:
                sig[arg] = "i32:16"
        consts = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BM=bm, BN=K.block_keys(block_d), PAGED=paged,
                      UPCAST=False, PRECISION="tf32", **masks[mask])
        label = f"decode split d{d} {dtype} g{group}xq{sq} {'paged' if paged else 'contiguous'} {mask}"
        yield label, K._decode_split, sig, consts, triton.Config({}, num_warps=K.warps_for(bm), num_stages=2)
    for d in (64, 128):
        sig = signature(K._decode_merge, {})
        for arg in ("O_part", "LSE_part", "LSE"):
            sig[arg] = "*fp32:16"
        sig["O"] = "*bf16:16"
        yield (f"decode merge d{d}", K._decode_merge, sig, dict(HEAD_DIM=d, BLOCK_D=d, SPLITS=16),
               triton.Config({}, num_warps=4, num_stages=1))


# op -> its variants; every op with Triton kernels adds itself here
VARIANTS = {"clip_loss": clip_loss_variants, "linear_cross_entropy": linear_cross_entropy_variants,
            "codebook_lookup": codebook_lookup_variants, "attention": attention_variants,
            "attention_decode": attention_decode_variants, "similarity_topk": similarity_topk_variants}


def main(argv=None) -> None:
    """Compile every variant for each capability; print a table, or JSON lines with --json."""
    import argparse
    import json
    import os
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--capability", type=int, action="append", help="e.g. 90 (default: 90 and 80)")
    parser.add_argument("--all-configs", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--op", action="append", choices=sorted(VARIANTS), help="default: every op")
    args = parser.parse_args(argv)
    variants = [v for op in (args.op or VARIANTS) for v in VARIANTS[op](args.all_configs)]
    for cap in args.capability or [90, 80]:
        for label, kernel, sig, consts, cfg in variants:
            warps, stages = (cfg.num_warps, cfg.num_stages) if cfg is not None else (4, 1)
            try:
                info = compile_kernel(kernel, sig, consts, cap, warps, stages).__dict__
            except Exception as e:  # a lowering failure is a result to report
                info = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
            config = cfg.kwargs if cfg is not None else {}
            row = {"capability": cap, "variant": label, "config": {**config, "warps": warps, "stages": stages}, **info}
            print(json.dumps(row) if args.json else f"sm_{cap} {label:28} {row['config']}: {info}", flush=True)


if __name__ == "__main__":
    main()
