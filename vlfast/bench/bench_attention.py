"""vlfast.attention against SDPA's backends and FlexAttention, on the shapes VLMs run.

    python -m vlfast bench attention [--quick] [--json PATH] [--plot PATH]

Peers in the same run (each only where it runs; the summary lists the rest):
  sdpa-flash / sdpa-cudnn / sdpa-efficient   is_causal for causal masks, else a dense boolean mask; GQA by
                                             enable_gqa=True
  sdpa (CPU)                                 the same, SDPA choosing its CPU kernel (the fused flash kernel
                                             where it applies, which vlfast's impl="torch" calls too)
  flex                                       torch.compile(flex_attention) with a block mask from an analytic
                                             mask_mod per mask kind (keep_rule; CPU: VLFAST_BENCH_CPU_FLEX=1)
The oracle is a float64 explicit softmax with the bench's own dense mask (keep_rule), not vlfast's code.
TFLOP/s count only the (query, key) pairs the mask keeps: 4 * D per kept pair forward, 3.5x that
forward + backward. Error columns (vs float64) come from the "-accuracy" cases, sized so that a
dense float64 reference is cheap; the speed cases report time and memory.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import vlfast.masks as M
from vlfast.bench.common import FWD, FWD_BWD, Case, Contender, vlfast_contenders
from vlfast.ops.attention import attention, attention_varlen, implementation_status

OP = "attention"
GRADS = ("d_q", "d_k", "d_v")
BOTH = (FWD, FWD_BWD)


def _case(name, b, h, s, d, mask_kind, dtype=torch.bfloat16, h_kv=None, accuracy=False, **mask_params):
    params = {"mask": mask_kind, "h_kv": h_kv or h, "accuracy": accuracy, **mask_params}
    return Case(name=name + ("-accuracy" if accuracy else ""), shape=(b, h, s, d), dtype=dtype, modes=BOTH,
                params=params)


def cases(device: torch.device, size: str) -> list:
    if size == "tiny":
        return [_case("causal", 1, 2, 64, 32, "causal", torch.float32, accuracy=True)]
    if device.type != "cuda":
        plan = [_case("causal", 2, 4, 256, 64, "causal", torch.float32, accuracy=True),
                _case("llava-prefix", 1, 4, 512, 64, "prefix", torch.float32, accuracy=True, prefix=144),
                _case("dalle-row", 1, 4, 64 + 256, 64, "dalle-row", torch.float32, accuracy=True, text=64, grid=16),
                # sizes where the masks' skipped pairs outweigh the kernel's cost per call (dense below them)
                _case("llava-prefix-1060", 1, 4, 1060, 64, "prefix", torch.float32, accuracy=True, prefix=576),
                _case("dalle-row-1280", 1, 8, 1280, 64, "dalle-row", torch.float32, accuracy=True, text=256, grid=32),
                _case("dalle-column-1280", 1, 8, 1280, 64, "dalle-column", torch.float32, accuracy=True, text=256,
                      grid=32)]
        return plan if size == "quick" else plan + [_case("clip-vit", 4, 8, 577, 64, "none", torch.float32)]
    accuracy = [_case("llava-causal", 1, 4, 1024, 128, "causal", accuracy=True),
                _case("llava-prefix", 1, 4, 1024, 128, "prefix", accuracy=True, prefix=576),
                _case("dalle-column", 1, 4, 1280, 64, "dalle-column", accuracy=True, text=256, grid=32),
                _case("clip-text", 64, 8, 77, 64, "text", accuracy=True)]
    speed = [_case("llava-causal", 4, 32, 2048, 128, "causal"),
             _case("llava-prefix", 4, 32, 2048, 128, "prefix", prefix=576),
             _case("clip-vit-l14-336", 32, 16, 577, 64, "none"),
             _case("dalle-row", 8, 16, 1280, 64, "dalle-row", text=256, grid=32),
             _case("dalle-column", 8, 16, 1280, 64, "dalle-column", text=256, grid=32),
             _case("dalle-conv", 8, 16, 1280, 64, "dalle-conv", text=256, grid=32),
             _case("clip-text", 1024, 8, 77, 64, "text")]
    if size == "quick":
        return accuracy[:1] + speed[:1]
    sweep = [_case(f"sweep-{'causal' if c else 'full'}", max(1, 16384 // s), 16, s, d, "causal" if c else "none")
             for d in (64, 128) for c in (True, False) for s in (1024, 4096, 16384)]
    return accuracy + speed + sweep


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[M.Mask]
    dense: Optional[torch.Tensor]  # (B or 1, 1, S, S) bool, for peers that take dense masks
    lengths: Optional[torch.Tensor]  # the text case: caption lengths

    def leaves(self) -> list:
        return [self.q, self.k, self.v]


def _mask(case: Case, device) -> tuple:
    """(vlfast mask, caption lengths or None) for the case."""
    p, (b, _, s, _) = case.params, case.shape
    kind = p["mask"]
    if kind == "none":
        return None, None
    if kind == "causal":
        return M.causal(), None
    if kind == "prefix":
        return M.image_prefix(p["prefix"], s, device=device), None
    if kind == "text":  # CLIP captions of 5..77 tokens: causal + key padding
        g = torch.Generator(device="cpu").manual_seed(0)
        lengths = torch.randint(5, s + 1, (b,), generator=g).to(device)
        return M.causal() & M.key_padding.from_lengths(lengths, s), lengths
    return M.dalle(p["text"], p["grid"], p["grid"], kind.split("-")[1]), None


def keep_rule(case: Case, lengths: Optional[torch.Tensor]):
    """The case's mask as plain index arithmetic, mask_mod(b, h, q_idx, kv_idx) -> bool (Sq == Sk), or None
    for no mask. Written here, independent of vlfast.masks: it builds the oracle's and SDPA's dense masks and
    is FlexAttention's mask_mod."""
    p = case.params
    kind = p["mask"]
    if kind == "none":
        return None
    if kind == "causal":
        return lambda b, h, q, k: k <= q
    if kind == "prefix":  # LLaVA: image tokens [0, P) see each other, the rest is causal
        n = p["prefix"]
        return lambda b, h, q, k: (k <= q) | ((q < n) & (k < n))
    if kind == "text":  # causal + right padding: key k of caption b is real when k < lengths[b]
        return lambda b, h, q, k: (k <= q) & (k < lengths[b])
    t, c, half = p["text"], p["grid"], 11 // 2  # DALL-E: text prefix t, a grid of c columns, conv kernel 11
    image = {"row": lambda q, k: (q - t) // c == (k - t) // c,
             "column": lambda q, k: (q - t) % c == (k - t) % c,
             "conv": lambda q, k: (((q - t) // c - (k - t) // c).abs() <= half)
             & (((q - t) % c - (k - t) % c).abs() <= half)}[kind.split("-")[1]]
    return lambda b, h, q, k: (k <= q) & ((k < t) | image(q, k))


def plain_dense_mask(case: Case, lengths: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """(B or 1, 1, S, S) bool from keep_rule, by broadcasting index tensors."""
    rule = keep_rule(case, lengths)
    if rule is None:
        return None
    b, _, s, _ = case.shape
    idx = torch.arange(s, device=device)
    batch = torch.arange(b if lengths is not None else 1, device=device)[:, None, None]
    return rule(batch, None, idx[None, :, None], idx[None, None, :]).expand(len(batch), s, s)[:, None]


def make_inputs(case: Case, device: torch.device) -> Inputs:
    b, h, s, d = case.shape
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, h, s, d, device=device, generator=g).to(case.dtype).requires_grad_()
    k, v = (torch.randn(b, case.params["h_kv"], s, d, device=device, generator=g).to(case.dtype).requires_grad_()
            for _ in range(2))
    mask, lengths = _mask(case, device)
    dense = plain_dense_mask(case, lengths, device)
    if mask is not None and not torch.equal(mask.to_dense(s, s, device)[:, None].expand_as(dense), dense):
        raise AssertionError(f"{case.name}: vlfast's mask and the bench's plain mask disagree")
    return Inputs(q, k, v, mask, dense, lengths)


def _kept_pairs(case: Case, x: Inputs) -> float:
    b, h, s, _ = case.shape
    return float(x.dense.sum()) * h * (b // x.dense.shape[0]) if x.dense is not None else float(b * h * s * s)


_KEPT = {}


def flops(case: Case, mode: str) -> float:
    kept = _KEPT.get(case.name)
    if kept is None:
        return 0.0
    return 4.0 * case.shape[3] * kept * (1 if mode == FWD else 3.5)


def reference(case: Case, x: Inputs, device: torch.device) -> tuple:
    _KEPT[case.name] = _kept_pairs(case, x)
    if not case.params["accuracy"]:
        return None, "speed case: errors come from the -accuracy cases"
    q, k, v = (t.detach().double().requires_grad_() for t in x.leaves())
    out = oracle(q, k, v, x.dense, case.shape[3] ** -0.5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    return {"out": out.detach(), **dict(zip(GRADS, grads))}, "fp64 explicit softmax, the bench's plain dense mask"


def oracle(q, k, v, dense: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """softmax(q k^T scale, masked) v in q's dtype, written out (not vlfast's); K/V heads repeated for GQA;
    a query with no kept key gives 0 (vlfast's convention). q (B, H, S, D), k/v (B, Hkv, S, D)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if dense is None:
        return torch.softmax(scores, -1) @ v
    scores = scores.masked_fill(~dense, float("-inf"))
    any_kept = dense.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~any_kept, 0.0), -1) * any_kept
    return probs @ v


def _runner(fn):
    """run(x, mode) -> the output and, for fwd+bwd, the gradients of out.sum()."""
    def run(x: Inputs, mode: str) -> dict:
        if mode == FWD:
            with torch.no_grad():
                return {"out": fn(x)}
        out = fn(x)
        grads = torch.autograd.grad(out.sum(), x.leaves())
        return {"out": out.detach(), **dict(zip(GRADS, grads))}
    return run


def _triton_configs() -> dict:
    """The launch configs the Triton kernels ran last, per pass, and where they came from (tuning.py)."""
    from vlfast.ops.attention import tuning
    return tuning.last_choices()


def _vlfast(case: Case, device: torch.device) -> list:
    def make_run(impl):
        def call(x):
            if impl == "triton":  # the row reports this call's configs only (fwd mode: no bwd entry)
                from vlfast.ops.attention import tuning
                tuning.last_choices(forget=True)
            return attention(x.q, x.k, x.v, mask=x.mask, impl=impl)
        return _runner(call)
    skip_reference = device.type == "cuda" and not case.params["accuracy"]
    out = vlfast_contenders(implementation_status(device, case.dtype, case.shape[3]), device, make_run,
                            "the reference path is the CPU path" if skip_reference else None,
                            describe={"triton": _triton_configs})
    if case.params["mask"] == "text":  # the packed layout: CLIP text without padding work
        out += [Contender(f"{c.name}-varlen", _runner(lambda x, impl=c.name[7:]: _varlen(x, impl)))
                for c in out if c.skip is None]
    return out


def _varlen(x: Inputs, impl: str) -> torch.Tensor:
    """Pack the captions, attend, and scatter back (zeros at padding), as a text tower would."""
    b, h, s, d = x.q.shape
    valid = x.mask.key_valid
    cu = torch.cat([x.lengths.new_zeros(1), x.lengths.cumsum(0)]).int()
    packed = [t.transpose(1, 2)[valid] for t in (x.q, x.k, x.v)]  # (T, H, D)
    out = attention_varlen(*packed, cu, cu, s, s, mask=M.causal(), impl=impl)
    full = out.new_zeros(b, s, h, d)
    full[valid] = out
    return full.transpose(1, 2)


def _sdpa(backend_name: Optional[str]):
    """SDPA as a user calls it: is_causal for a plain causal mask, else the dense boolean mask; GQA through
    enable_gqa (no repeated K/V)."""
    def fn(x: Inputs):
        gqa = x.q.shape[1] != x.k.shape[1]
        causal = x.mask is not None and x.mask.causal and x.mask.span_ids is None and x.mask.dalle is None \
            and x.mask.key_valid is None and x.mask.window is None
        attn_mask = None if causal or x.dense is None else x.dense
        if backend_name is None:
            return F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=attn_mask, is_causal=causal,
                                                  enable_gqa=gqa)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([getattr(SDPBackend, backend_name)]):
            return F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=attn_mask, is_causal=causal,
                                                  enable_gqa=gqa)
    return fn


_FLEX = {}


def _flex_fn(case: Case):
    """torch.compile(flex_attention) with a block mask from the analytic mask_mod (keep_rule), built once per
    case: fully masked blocks are skipped as FlexAttention does for a user's mask_mod."""
    def fn(x: Inputs):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        if "fn" not in _FLEX:
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        b, _, s, _ = x.q.shape
        if _FLEX.get("case") != case.name:
            rule = keep_rule(case, x.lengths)
            _FLEX["case"] = case.name
            _FLEX["block_mask"] = None if rule is None else create_block_mask(
                rule, b if x.lengths is not None else None, None, s, s, device=x.q.device)
        q, k, v = (t.detach() if not t.is_cuda else t for t in x.leaves())  # CPU: forward only (no backward)
        return _FLEX["fn"](q, k, v, block_mask=_FLEX["block_mask"], enable_gqa=x.q.shape[1] != x.k.shape[1])
    return fn


def contenders(case: Case, device: torch.device) -> list:
    peers = []
    if device.type == "cuda":
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            peers.append(Contender(f"sdpa-{backend.split('_')[0].lower()}", _runner(_sdpa(backend))))
        peers.append(Contender("flex[compiled, analytic mask_mod]", _runner(_flex_fn(case))))
    else:
        peers.append(Contender("sdpa[dense bool mask; is_causal for causal]", _runner(_sdpa(None))))
        peers.append(_cpu_flex(case))
    return _vlfast(case, device) + peers


def _cpu_flex(case: Case) -> Contender:
    """Compiled FlexAttention on a CPU: forward only (torch 2.13 raises "FlexAttention does not support
    backward on CPU"), and opt-in, its inductor compile being slow for the quick bench."""
    name = "flex[compiled, analytic mask_mod]"
    if os.environ.get("VLFAST_BENCH_CPU_FLEX", "0") != "1":
        return Contender(name, skip="on a CPU FlexAttention has no backward (torch 2.13) and compiles 5-10 s per case; "
                                    "VLFAST_BENCH_CPU_FLEX=1 times its forward")
    return Contender(name, _runner(_flex_fn(case)), modes=(FWD,))


if __name__ == "__main__":
    from vlfast.bench.runner import main
    sys.exit(main([OP] + sys.argv[1:]))
