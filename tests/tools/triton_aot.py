"""Compile a Triton kernel for a GPU architecture on a machine without one, and read off what the
code generator did: shared memory, registers and spills (ptxas -v), tensor-core and async-copy use.

The compile tests use it to catch what the interpreter cannot (lowering failures, no tensor cores,
no pipelining); by hand, `python -m tests.tools.triton_aot` prints the table for vlfast's kernels.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Arguments the JIT sees 16-divisible at real launches (aligned pointers; strides of rows of
# 8+ half-precision elements), which is what lets it vectorise loads and pipeline them.
ALIGNED_INTS = ("stride_a", "stride_b", "stride_g")


@dataclass
class CompiledInfo:
    shared_bytes: int
    registers: Optional[int]
    spill_bytes: Optional[int]
    wgmma: int         # Hopper warpgroup MMAs
    mma_sync: int      # Ampere-style MMAs
    async_copies: int  # cp.async: global loads pipelined into shared memory


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
    return CompiledInfo(compiled.metadata.shared, regs, spills, ptx.count("wgmma.mma_async"),
                        ptx.count("mma.sync"), ptx.count("cp.async"))


LAYOUTS = {"softmax-sym": (False, True, True), "softmax-rows": (False, False, True),
           "sigmoid": (True, False, True), "sigmoid-neg": (True, False, False)}


def clip_loss_variants(all_configs: bool = False):
    """(label, kernel, signature, constexprs, config) for the contrastive-loss kernels: every layout
    and input dtype (fp32 both exact and as TF32; fp16 through the masked-K path of odd D), on the
    family's default config or on all of them."""
    from vlfast.ops.clip_loss import triton as K
    dtypes = (("bf16", "tf32", True), ("fp16", "tf32", False), ("fp32", "tf32", True), ("fp32", "ieee", True))
    for kernel, name in ((K._logit_stats_kernel, "stats"), (K._logit_grad_kernel, "grad")):
        for layout, (sigmoid, symmetric, has_pos) in LAYOUTS.items():
            for dtype, precision, even_k in dtypes:
                family = K._family(precision)
                for config in family if all_configs else family[:1]:
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
    kernel = K._ce_rows_kernel
    for dtype in ("bf16", "fp32"):
        for stats, label in ((True, "fwd"), (False, "bwd")):
            consts = dict(HAS_BIAS=True, SOFTCAP=True, COMPUTE_STATS=stats, WRITE_GRAD=True, BLOCK_V=K.BLOCK_V)
            sig = signature(kernel, {"g_ptr": dtype, "bias_ptr": dtype, "targets_ptr": "i64"})
            yield f"ce_rows {label} {dtype}", kernel, sig, consts, K.ROW_KERNEL_CONFIG


# op -> its variants; every op with Triton kernels adds itself here
VARIANTS = {"clip_loss": clip_loss_variants, "linear_cross_entropy": linear_cross_entropy_variants}


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
