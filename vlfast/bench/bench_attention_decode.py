"""vlfast.attention_decode (one generation step against a KV cache) against SDPA and the decode peers.

    python -m vlfast bench attention_decode [--quick] [--json PATH] [--plot PATH]

Each case is one new query per sequence at the end of a full cache of L tokens (B x L x Hq/Hkv x D).
Memory-bound: the rows report GB/s of cache read, 2 B L Hkv D bytes per element size, over the time
(on a GPU do_bench flushes the L2 between calls). vlfast reads a paged cache where the case says so;
sdpa reads the same keys contiguous, sdpa[gathered pages] gathers them from the pages first. Peers (each
only where it imports; the summary lists the rest):
  sdpa                F.scaled_dot_product_attention(enable_gqa=True), a dense boolean mask for DALL-E,
                      on the contiguous cache (the bandwidth bar); on a paged case it is named
                      sdpa[contiguous cache] and is a bar only (Contender.bar): it does not read pages
  sdpa[gathered pages]  paged cases: the pages gathered into rows (what PyTorch alone does with a
                      paged cache), then sdpa
  flash_attn_kvcache  flash_attn.flash_attn_with_kvcache (GPU), paged where the case is paged
Oracle: float64 softmax attention with this bench's own mask arithmetic (bench_attention.keep_rule).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import vlfast
from vlfast import masks as M
from vlfast.bench.common import FWD, Case, Contender, import_peer, settings, vlfast_contenders
from vlfast.ops.attention_decode import implementation_status

OP = "attention_decode"
TEXT, GRID = 256, 32  # DALL-E: 256 text tokens + a 32 x 32 image grid = 1280
ORACLE_LIMIT = 1 << 29  # float64 cache elements (4 GiB) above which the error columns are skipped


def _case(b, length, hq, hkv, d, mask="causal", page=None, dtype=torch.bfloat16):
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    name = f"{b}x{length}x{hq}/{hkv}x{d}-{mask}" + (f"-paged{page}" if page else "") + f"-{short}"
    return Case(name=name, shape=(b, length, hq, hkv, d), dtype=dtype, modes=(FWD,),
                params={"mask": mask, "page": page})


def cases(device: torch.device, size: str) -> list:
    """size: "full" (the issue's goal table on a GPU), "quick", or "tiny" (tests)."""
    if size == "tiny":
        return [_case(2, 100, 4, 2, 16, page=16, dtype=torch.float32)]
    if device.type != "cuda":
        fp32 = torch.float32
        return [_case(4, 2048, 8, 2, 64, page=16, dtype=fp32), _case(2, 1280, 16, 16, 64, dtype=fp32),
                _case(2, 1280, 16, 16, 64, "dalle-row", dtype=fp32)]
    dalle = [_case(8, 1280, 16, 16, 64, kind) for kind in ("causal", "dalle-row", "dalle-column", "dalle-conv")]
    if size == "quick":
        return [_case(1, 4096, 32, 32, 128), _case(64, 4096, 32, 8, 128, page=16)] + dalle[:2]
    return [_case(1, 4096, 32, 32, 128), _case(8, 32768, 32, 8, 128), _case(64, 4096, 32, 8, 128, page=16)] + dalle


@dataclass
class Inputs:
    q: torch.Tensor                       # (B, Hq, 1, D)
    k: torch.Tensor                       # (B, Hkv, L, D) contiguous: the peers' and the oracle's cache
    v: torch.Tensor
    k_cache: torch.Tensor                 # vlfast's: k, or its pages
    v_cache: torch.Tensor
    block_table: Optional[torch.Tensor]
    lengths: torch.Tensor                 # (B,) int32, all L
    mask: Optional[M.Mask]
    dense: Optional[torch.Tensor]         # (1, 1, 1, L) bool from keep_rule, or None (every key kept)


def _paged(cache: torch.Tensor, page: int, order: torch.Tensor) -> torch.Tensor:
    """The cache's rows cut into pages (the last one zero-padded), stored in the shuffled `order`."""
    b, hkv, length, d = cache.shape
    per_row = -(-length // page)
    padded = F.pad(cache, (0, 0, 0, per_row * page - length))
    pages = torch.empty(b * per_row, hkv, page, d, dtype=cache.dtype, device=cache.device)
    pages[order] = padded.view(b, hkv, per_row, page, d).permute(0, 2, 1, 3, 4).reshape(-1, hkv, page, d)
    return pages


def keep_rule(kind: str):
    """mask_mod(q_pos, k_pos) -> bool for the case, written here (DALL-E: a text prefix, a grid of GRID
    columns, conv kernel 11), independent of vlfast.masks."""
    if kind in ("none", "causal"):
        return None if kind == "none" else (lambda q, k: k <= q)
    t, c, half = TEXT, GRID, 11 // 2
    image = {"row": lambda q, k: (q - t) // c == (k - t) // c,
             "column": lambda q, k: (q - t) % c == (k - t) % c,
             "conv": lambda q, k: (((q - t) // c - (k - t) // c).abs() <= half)
             & (((q - t) % c - (k - t) % c).abs() <= half)}[kind.split("-")[1]]
    return lambda q, k: (k <= q) & ((k < t) | image(q, k))


def make_inputs(case: Case, device: torch.device) -> Inputs:
    b, length, hq, hkv, d = case.shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device=device, generator=g).to(case.dtype)
               for h, s in ((hq, 1), (hkv, length), (hkv, length)))
    page = case.params["page"]
    table = None
    k_cache, v_cache = k, v
    if page:
        order = torch.randperm(b * -(-length // page), device=device, generator=g)
        table = order.view(b, -1).to(torch.int32)
        k_cache, v_cache = _paged(k, page, order), _paged(v, page, order)
    kind = case.params["mask"]
    mask = None if kind == "none" else M.causal() if kind == "causal" else \
        M.dalle(TEXT, GRID, GRID, kind.split("-")[1], kernel=11)
    rule = keep_rule(kind)
    pos = torch.arange(length, device=device)
    dense = None if kind in ("none", "causal") else rule(pos[-1:, None], pos[None, :])[None, None]
    return Inputs(q, k, v, k_cache, v_cache, table, torch.full((b,), length, dtype=torch.int32, device=device),
                  mask, dense)


def bytes_read(case: Case) -> float:
    """The cache bytes a decode step must read: keys and values of every row."""
    b, length, _, hkv, d = case.shape
    return 2.0 * b * length * hkv * d * torch.finfo(case.dtype).bits / 8


def flops(case: Case, mode: str) -> float:
    b, length, hq, _, d = case.shape
    return 4.0 * b * hq * length * d


def reference(case: Case, x: Inputs, device: torch.device) -> tuple:
    b, length, hq, hkv, d = case.shape
    if b * hkv * length * d > ORACLE_LIMIT:
        return None, "no fp64 reference: the cache is above this bench's float64 limit"
    return {"out": oracle(x.q, x.k, x.v, x.dense)}, "fp64 softmax attention, this bench's own mask arithmetic"


def oracle(q, k, v, dense: Optional[torch.Tensor]) -> torch.Tensor:
    """float64 attention of q (B, Hq, 1, D) over k, v (B, Hkv, L, D); dense (1, 1, 1, L) or None."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qg = q.double().reshape(b, hkv, hq // hkv, d)  # a KV head's query heads (no repeated K/V)
    s = qg @ k.double().transpose(-1, -2) / math.sqrt(d)  # (B, Hkv, G, L)
    if dense is not None:
        s = s.masked_fill(~dense[0], float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.double()).reshape(b, hq, 1, d)


def _runner(fn):
    def run(x: Inputs, mode: str) -> dict:
        with torch.no_grad():
            return {"out": fn(x)}
    return run


def _sdpa(x: Inputs):
    return F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=x.dense, enable_gqa=x.q.shape[1] != x.k.shape[1])


def _sdpa_gathered(x: Inputs):
    b, hkv, length, d = x.k.shape
    rows = [c[x.block_table.long()].permute(0, 2, 1, 3, 4).reshape(b, hkv, -1, d)[:, :, :length]
            for c in (x.k_cache, x.v_cache)]
    return F.scaled_dot_product_attention(x.q, *rows, attn_mask=x.dense, enable_gqa=x.q.shape[1] != hkv)


def _flash_kvcache(case: Case) -> Contender:
    name = "flash_attn_kvcache"
    fn, why = import_peer("flash_attn", "flash_attn_with_kvcache")
    if fn is None:
        return Contender(name, skip=why)
    if case.params["mask"].startswith("dalle"):
        return Contender(name, skip="flash_attn_with_kvcache takes causal / local windows, not DALL-E's masks")
    if case.params["page"] and case.params["page"] % 256:
        return Contender(name, skip="flash_attn_with_kvcache's paged cache takes pages of a multiple of 256 tokens")

    def run(x: Inputs):  # its layout: q (B, 1, Hq, D), caches (B, L, Hkv, D) or pages (n, page, Hkv, D)
        kc, vc = (c.transpose(1, 2) for c in (x.k_cache, x.v_cache))
        return fn(x.q.transpose(1, 2), kc, vc, cache_seqlens=x.lengths, block_table=x.block_table,
                  causal=True).transpose(1, 2)
    return Contender(name, _runner(run), describe=settings(paged=case.params["page"] is not None))


def contenders(case: Case, device: torch.device) -> list:
    # check_lengths=False, as vlfast.generation steps call it: the check is one host sync per call,
    # which the peers do not make (their rows would time the GPU, ours the round trip).
    def make_run(impl):
        return _runner(lambda x: vlfast.attention_decode(x.q, x.k_cache, x.v_cache, x.lengths,
                                                         block_table=x.block_table, mask=x.mask,
                                                         check_lengths=False, impl=impl))
    status = implementation_status(device, case.dtype, case.shape[4])
    ours = vlfast_contenders(status, device, make_run,
                             describe={impl: settings(check_lengths=False) for impl in status})
    # On a paged case the contiguous cache is the bandwidth bar, not a peer: no PyTorch op reads pages
    sdpa = Contender("sdpa[contiguous cache]" if case.params["page"] else "sdpa", _runner(_sdpa), describe=settings(
        mask="dense bool (1, 1, 1, L)" if case.params["mask"].startswith("dalle") else "none (the last query sees "
             "every key)", enable_gqa=True, cache="contiguous"), bar=bool(case.params["page"]))
    peers = [sdpa]
    if case.params["page"]:
        peers.append(Contender("sdpa[gathered pages]", _runner(_sdpa_gathered), describe=settings(
            gather="cache[block_table] -> (B, Hkv, L, D)", enable_gqa=True)))
    return ours + peers + ([_flash_kvcache(case)] if device.type == "cuda" else [])


if __name__ == "__main__":
    from vlfast.bench.runner import main
    sys.exit(main([OP] + sys.argv[1:]))
