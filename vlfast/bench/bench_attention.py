"""vlfast.attention against SDPA's backends and FlexAttention, on the shapes VLMs run.

    python -m vlfast bench attention [--quick] [--json PATH] [--plot PATH]

Peers in the same run (each only where it runs; the summary lists the rest):
  sdpa-flash / sdpa-cudnn / sdpa-efficient   is_causal for causal masks, else a dense boolean mask
  sdpa-math (CPU)                            the same through PyTorch's math path
  flex                                       torch.compile(flex_attention) with the equivalent block mask
TFLOP/s count only the (query, key) pairs the mask keeps: 4 * D per kept pair forward, 3.5x that
forward + backward. Error columns (vs float64) come from the "-accuracy" cases, sized so that a
dense float64 reference is cheap; the speed cases report time and memory.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import vlfast.masks as M
from vlfast.bench.common import FWD, FWD_BWD, Case, Contender, vlfast_contenders
from vlfast.ops.attention import attention, attention_varlen, implementation_status
from vlfast.ops.attention.reference import attention_dense

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
                _case("dalle-row", 1, 4, 64 + 256, 64, "dalle-row", torch.float32, accuracy=True, text=64, grid=16)]
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


def make_inputs(case: Case, device: torch.device) -> Inputs:
    b, h, s, d = case.shape
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, h, s, d, device=device, generator=g).to(case.dtype).requires_grad_()
    k, v = (torch.randn(b, case.params["h_kv"], s, d, device=device, generator=g).to(case.dtype).requires_grad_()
            for _ in range(2))
    mask, lengths = _mask(case, device)
    dense = mask.to_dense(s, s, device)[:, None] if mask is not None else None
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
    out = attention_dense(q, k, v, x.mask, case.shape[3] ** -0.5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    return {"out": out.detach(), **dict(zip(GRADS, grads))}, "fp64 dense"


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
    def fn(x: Inputs):
        group = x.q.shape[1] // x.k.shape[1]
        k, v = (t.repeat_interleave(group, 1) if group > 1 else t for t in (x.k, x.v))
        causal = x.mask is not None and x.mask.causal and x.mask.span_ids is None and x.mask.dalle is None \
            and x.mask.key_valid is None and x.mask.window is None
        attn_mask = None if causal or x.dense is None else x.dense
        if backend_name is None:
            return F.scaled_dot_product_attention(x.q, k, v, attn_mask=attn_mask, is_causal=causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([getattr(SDPBackend, backend_name)]):
            return F.scaled_dot_product_attention(x.q, k, v, attn_mask=attn_mask, is_causal=causal)
    return fn


_FLEX = {}


def _flex_fn(x: Inputs):
    """FlexAttention with a block mask built from the same dense mask (cached per mask)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    b, h, s, _ = x.q.shape
    key = (id(x.dense), s)
    if key not in _FLEX:
        dense = x.dense[:, 0] if x.dense is not None else None

        def mask_mod(bb, hh, qi, ki):
            if dense is None:
                return qi >= 0
            return dense[bb if dense.shape[0] > 1 else 0, qi, ki]
        _FLEX[key] = create_block_mask(mask_mod, dense.shape[0] if dense is not None else None, None, s, s,
                                       device=x.q.device)
    group = x.q.shape[1] // x.k.shape[1]
    return _FLEX["fn"](x.q, x.k, x.v, block_mask=_FLEX[key], enable_gqa=group > 1)


def contenders(case: Case, device: torch.device) -> list:
    peers = []
    if device.type == "cuda":
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            peers.append(Contender(f"sdpa-{backend.split('_')[0].lower()}", _runner(_sdpa(backend))))
        peers.append(Contender("flex", _runner(_flex_fn)))
    else:
        peers.append(Contender("sdpa-math", _runner(_sdpa(None))))
        peers.append(Contender("flex", skip="runs on CUDA devices only here"))
    return _vlfast(case, device) + peers


if __name__ == "__main__":
    from vlfast.bench.runner import main
    sys.exit(main([OP] + sys.argv[1:]))
