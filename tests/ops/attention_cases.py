"""The attention masks of design.md written as plain loops (independent of vlfast.masks), inputs,
the float64 reference and the same-dtype PyTorch baseline for the attention tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import vlfast.masks as M
from vlfast.ops.attention import attention


def loop_mask(kind: str, sq: int, sk: int, **p) -> torch.Tensor:
    """(Sq, Sk) bool from the contract's words, one pair at a time. Query i sits at i + (Sk - Sq)."""
    out = torch.zeros(sq, sk, dtype=torch.bool)
    for i in range(sq):
        pi = i + sk - sq
        for j in range(sk):
            if kind == "none":
                keep = True
            elif kind == "causal":
                keep = j <= pi
            elif kind == "window":
                keep = j <= pi and pi - j < p["window"]
            elif kind == "spans":
                ids = p["ids"]
                same = 0 <= pi < sk and ids[pi] >= 0 and ids[pi] == ids[j]
                keep = j <= pi or same
            elif kind.startswith("dalle"):
                t, cols = p["text_len"], p["cols"]
                keep = j <= pi
                if keep and j >= t:  # image key (the query is then an image token too)
                    rq, cq, rk, ck = (pi - t) // cols, (pi - t) % cols, (j - t) // cols, (j - t) % cols
                    if kind == "dalle-row":
                        keep = rq == rk
                    elif kind == "dalle-column":
                        keep = cq == ck
                    else:
                        keep = abs(rq - rk) <= p["kernel"] // 2 and abs(cq - ck) <= p["kernel"] // 2
            out[i, j] = keep
    return out


def vlfast_mask(kind: str, sk: int, **p):
    if kind == "none":
        return None
    if kind == "causal":
        return M.causal()
    if kind == "window":
        return M.sliding_window(p["window"])
    if kind == "spans":
        return M.spans(torch.tensor(p["ids"], dtype=torch.int32))
    return M.dalle(p["text_len"], p["rows"], p["cols"], kind.split("-")[1], p.get("kernel", 11))


def span_ids(sk: int, spans: list) -> list:
    """-1 everywhere but the given (start, length) spans, numbered 0, 1, ..."""
    ids = [-1] * sk
    for n, (start, length) in enumerate(spans):
        for t in range(start, min(sk, start + length)):
            ids[t] = n
    return ids


def make_qkv(b, h, h_kv, sq, sk, d, dtype, device="cpu"):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    q, k, v, do = (torch.randn(*shape, generator=g, dtype=torch.float64)
                   for shape in ((b, h, sq, d), (b, h_kv, sk, d), (b, h_kv, sk, d), (b, h, sq, d)))
    return tuple(x.to(device, dtype) for x in (q, k, v)) + (do.to(device, dtype),)


def _leaves(xs, dtype=None):
    return [x.detach().to(dtype or x.dtype).clone().requires_grad_() for x in xs]


def _collect(out, do, leaves):
    out.backward(do.to(out.dtype))
    return {"out": out.detach().double(), "dq": leaves[0].grad.double(), "dk": leaves[1].grad.double(),
            "dv": leaves[2].grad.double()}


def reference64(q, k, v, do, dense_keep):
    """Float64 attention with an explicit dense mask; rows that keep nothing give 0."""
    q, k, v = _leaves((q, k, v), torch.float64)
    group = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(group, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
    p = torch.softmax(s if dense_keep is None else s.masked_fill(~dense_keep, float("-inf")), dim=-1)
    if dense_keep is not None:  # zero the rows that keep nothing (NaN from softmax); NaN inputs stay NaN
        p = torch.where(dense_keep.any(-1, keepdim=True), p, torch.zeros_like(p))
    return _collect(p @ v.repeat_interleave(group, 1), do, (q, k, v))


def pytorch_same_dtype(q, k, v, do, dense_keep):
    """SDPA in the inputs' dtype with the dense mask (rows that keep nothing zeroed, as ours)."""
    q, k, v = _leaves((q, k, v))
    group = q.shape[1] // k.shape[1]
    mask = dense_keep if dense_keep is not None else None
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         attn_mask=mask)
    if dense_keep is not None:
        out = torch.where(dense_keep.any(-1, keepdim=True), out, torch.zeros_like(out)).nan_to_num(0.0)
    return _collect(out, do, (q, k, v))


def run_vlfast(q, k, v, do, mask, impl):
    q, k, v = _leaves((q, k, v))
    return _collect(attention(q, k, v, mask=mask, impl=impl), do, (q, k, v))
