"""Every variant of vlfast's CUDA kernels once, on small odd shapes: the program that
benchmarks/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 benchmarks/cuda_smoke.py

With the caching allocator off each tensor is its own cudaMalloc, so a read or write past a tensor's
end is outside any allocation and memcheck sees it. --tiny keeps to one shape (racecheck is slow).
Exits non-zero when a result is not finite (or a codebook index is out of range).
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="one small shape per variant")
    args = parser.parse_args(argv)
    bad = clip_loss(args.tiny) + codebook_lookup(args.tiny)
    print(f"{bad} of the runs gave non-finite results")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
