"""Every variant of vlfast's CUDA kernels once, on small odd shapes: the program that
benchmarks/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 benchmarks/cuda_smoke.py

With the caching allocator off each tensor is its own cudaMalloc, so a read or write past a tensor's
end is outside any allocation and memcheck sees it. --tiny keeps to one shape (racecheck is slow).
Exits non-zero when a result is not finite (or a codebook index is out of range, or decode attention or
similarity_topk differs from impl="torch").
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

LAYOUTS = [("softmax", True, 0, 0), ("softmax", False, 3, 11), ("sigmoid", True, 0, 0), ("sigmoid", True, None, 6)]


def _report(ok: bool, what: str) -> int:
    print(f"{'ok ' if ok else 'BAD'} {what}", flush=True)
    return 0 if ok else 1


def clip_loss(tiny: bool) -> int:
    """Forward and backward of every layout and dtype; returns the number of bad runs."""
    import vlfast
    from vlfast.ops.clip_loss import partials

    # Several row chunks and column splits even at these sizes.
    partials.GRAD_CHUNK_BYTES = 128 * 512 * 4
    shapes = [(130, 40)] if tiny else [(1, 8), (97, 100), (130, 40), (300, 72)]
    bad = 0
    for (n, d), dtype, (kind, symmetric, offset, extra) in itertools.product(
            shapes, (torch.float32, torch.bfloat16, torch.float16), LAYOUTS):
        g = torch.Generator(device="cuda").manual_seed(n * d)
        a = torch.randn(n, d, device="cuda", generator=g).to(dtype).requires_grad_()
        b = torch.randn(n + extra, d, device="cuda", generator=g).to(dtype).requires_grad_()
        s = torch.tensor(5.0, device="cuda", requires_grad=True)
        bias = torch.tensor(-2.0, device="cuda", requires_grad=True) if kind == "sigmoid" else None
        loss = vlfast.clip_loss(a, b, s, bias, kind=kind, symmetric=symmetric, positive_offset=offset, impl="cuda")
        loss.backward()
        torch.cuda.synchronize()
        outputs = [loss, a.grad, b.grad, s.grad] + ([bias.grad] if bias is not None else [])
        bad += _report(all(bool(torch.isfinite(x).all()) for x in outputs),
                       f"clip_loss {kind:7} sym={symmetric!s:5} offset={offset!s:4} {n}x{n + extra}x{d} "
                       f"{str(dtype).removeprefix('torch.')}")
    return bad


def codebook_lookup(tiny: bool) -> int:
    """The scan (several row blocks and codebook splits, a ragged last tile, the float32 pre-pass) and
    the distance kernel, both metrics and every dtype; returns the number of bad runs."""
    import vlfast

    shapes = [(130, 300, 40)] if tiny else [(1, 1, 3), (97, 300, 40), (130, 129, 100), (300, 1000, 72)]
    bad = 0
    for (n, k, d), dtype, metric in itertools.product(shapes, (torch.float32, torch.bfloat16, torch.float16),
                                                      ("l2", "cosine")):
        g = torch.Generator(device="cuda").manual_seed(n * k * d)
        z = torch.randn(n, d, device="cuda", generator=g).to(dtype)
        e = torch.randn(k, d, device="cuda", generator=g).to(dtype)
        index, dist = vlfast.codebook_lookup(z, e, metric=metric, impl="cuda")
        torch.cuda.synchronize()
        ok = bool(((index >= 0) & (index < k)).all()) and bool(torch.isfinite(dist).all())
        bad += _report(ok, f"codebook_lookup {metric:6} {n}x{k}x{d} {str(dtype).removeprefix('torch.')}")
    return bad


def similarity_topk(tiny: bool) -> int:
    """The emit kernel (several row blocks and key splits, a ragged last tile, the float32 pre-pass,
    sampled thresholds past 4096 keys, a forced overflow) and the float64 pair scores, every metric and
    dtype; compared with impl="torch". Returns the number of bad runs."""
    import vlfast
    from vlfast.ops.similarity_topk import filter as topk_filter

    shapes = [(130, 300, 40, 7)] if tiny else [(1, 1, 3, 1), (97, 300, 40, 7), (130, 5000, 100, 50), (300, 9000, 72, 300)]
    bad = 0
    for (n, m, d, k), dtype, metric in itertools.product(shapes, (torch.float32, torch.bfloat16, torch.float16),
                                                         ("ip", "cosine", "l2")):
        g = torch.Generator(device="cuda").manual_seed(n * m * d)
        q = torch.randn(n, d, device="cuda", generator=g).to(dtype)
        keys = torch.randn(m, d, device="cuda", generator=g).to(dtype)
        keys[m // 2:m // 2 + min(m // 2, 200)] = keys[0]  # ties past the buffers of the rows near key 0
        got = vlfast.similarity_topk(q, keys, k, metric=metric, impl="cuda")
        want = vlfast.similarity_topk(q, keys, k, metric=metric, impl="torch")
        ok = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        bad += _report(ok, f"similarity_topk {metric:6} {n}x{m}x{d} k{k} {str(dtype).removeprefix('torch.')}")
    assert topk_filter.SAMPLE_MIN <= 5000  # the larger shapes take sampled thresholds
    return bad


def attention_decode(tiny: bool) -> int:
    """The split and merge kernels: every dims-per-lane variant (d <= 64, <= 128, <= 256), groups of one
    and of several 16-row chunks, contiguous / transposed / paged (pages of 1 and 5) caches, several
    splits, the masks; compared with impl="torch". Returns the number of bad runs."""
    import vlfast
    from vlfast import masks

    shapes = [(3, 8, 2, 1, 80, 100)] if tiny else [(3, 8, 2, 1, 80, 100), (2, 4, 4, 1, 64, 37), (2, 8, 1, 5, 256, 70),
                                                     (1, 32, 4, 16, 128, 300)]
    layouts = ["paged-5"] if tiny else ["contiguous", "transposed", "paged-1", "paged-5"]
    bad = 0
    for (b, hq, hkv, sq, d, s_max), dtype, layout in itertools.product(
            shapes, (torch.float32, torch.bfloat16, torch.float16), layouts):
        g = torch.Generator(device="cuda").manual_seed(b * hq * d + s_max)
        q = torch.randn(b, hq, sq, d, device="cuda", generator=g).to(dtype)
        k = torch.randn(b, hkv, s_max, d, device="cuda", generator=g).to(dtype)
        v = torch.randn(b, hkv, s_max, d, device="cuda", generator=g).to(dtype)
        lengths = torch.tensor([s_max - 3 * row for row in range(b)], dtype=torch.int32, device="cuda")
        table = None
        if layout == "transposed":
            k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
        elif layout.startswith("paged"):
            page = int(layout.split("-")[1])
            per_row = -(-s_max // page)
            table = torch.randperm(b * per_row, device="cuda", generator=g).view(b, per_row).to(torch.int32)
            k, v = (torch.zeros(b * per_row, hkv, page, d, dtype=dtype, device="cuda").index_copy_(
                0, table.flatten().long(), torch.nn.functional.pad(x, (0, 0, 0, per_row * page - s_max))
                .view(b, hkv, per_row, page, d).transpose(1, 2).flatten(0, 1)) for x in (k, v))
        valid = torch.rand(b, s_max, device="cuda", generator=g) > 0.2
        kinds = [("causal", masks.causal()), ("window+padding", masks.sliding_window(9) & masks.key_padding(valid))]
        if s_max <= 106:  # the DALL-E grid covers 10 + 8 x 12 positions
            kinds.append(("dalle-conv", masks.dalle(10, 8, 12, "conv", kernel=5)))
        for name, mask in kinds:
            with torch.no_grad():
                out = vlfast.attention_decode(q, k, v, lengths, block_table=table, mask=mask, num_splits=3, impl="cuda")
                want = vlfast.attention_decode(q, k, v, lengths, block_table=table, mask=mask, impl="torch")
            torch.cuda.synchronize()
            ok = bool(torch.isfinite(out).all()) and torch.allclose(out.float(), want.float(), atol=3e-2, rtol=3e-2)
            bad += _report(ok, f"attention_decode {layout:10} {name:14} b={b} hq={hq} hkv={hkv} sq={sq} d={d} "
                               f"s_max={s_max} {str(dtype).removeprefix('torch.')}")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="one small shape per variant")
    args = parser.parse_args(argv)
    bad = clip_loss(args.tiny) + codebook_lookup(args.tiny) + attention_decode(args.tiny) + similarity_topk(args.tiny)
    print(f"{bad} of the runs gave bad results")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
