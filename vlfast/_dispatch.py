"""Choosing an implementation for an op: impl="auto" | "reference" | "torch" | "triton" | "cuda".

"reference" is the spec: plain PyTorch written to be read, fp32/fp64 math, what the tests check
against. "torch" is the fast composition of PyTorch's own kernels (SDPA, chunked GEMMs,
F.cross_entropy, matmul + argmin) with the same guarantees; it runs on any device and is the CPU path.
"auto" (or the environment variable VLFAST_IMPL) prefers the CUDA extension where it has been
measured fastest for the op (AUTO_PREFERS_CUDA), then Triton on a GPU, then "torch". Any other value
is an explicit choice: it runs or raises with the reason, it never falls back.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import torch

from . import _env

IMPLS = ("reference", "torch", "triton", "cuda")
_CHOICES = ("auto",) + IMPLS
_AUTO_ORDER = ("cuda", "triton", "torch", "reference")

# Ops for which impl="auto" takes the CUDA extension (where it can run) ahead of Triton. An op goes
# True only once benchmarks/gpu_check.sh has measured its CUDA kernels faster than its Triton ones
# on the shapes of its goals (figures in benchmarks/results/); until then impl="cuda" must be asked for.
AUTO_PREFERS_CUDA = {
    # H100 2026-12-05 (h100-2026-12-05-quick.json): Triton faster in all four bf16 cases (1.99 vs 2.15 ms
    # at 4096 x 512 up to 17.5 vs 21.7 at 32768 x 512), CUDA only in exact fp32 (2.57 vs 3.84 ms).
    "clip_loss": False,
    # Same run, N 65536 x K 8192 x D 256: CUDA 16.4 vs 17.4 ms (fp32), 9.6 vs 10.8 (bf16 VQ step),
    # 6.17 vs 6.07 (bf16 lookup alone, a tie).
    "codebook_lookup": True,
}


class ImplUnavailableError(RuntimeError):
    """An explicitly requested implementation cannot run these inputs."""


def requested_impl(impl: str) -> str:
    """The caller's choice, with "auto" replaced by VLFAST_IMPL when that is set."""
    if impl not in _CHOICES:
        raise ValueError(f"impl must be one of {_CHOICES}, got {impl!r}")
    if impl == "auto":
        impl = _env.choice("VLFAST_IMPL", _CHOICES, "auto")
    return impl


def resolve_impl(op: str, impl: str, device: torch.device,
                 why_not: Union[Mapping[str, Callable[[], Optional[str]]], Callable[[], Mapping]]) -> str:
    """Pick the implementation that runs `op`.

    why_not maps each implementation to a function returning None when it can run the inputs at
    hand, or a sentence saying why it cannot; or it is a function that builds that mapping, called
    only where it is needed (impl="auto" off a GPU needs none: a small CPU call saves its microseconds).
    """
    choice = requested_impl(impl)
    if choice == "auto" and device.type != "cuda":  # off a GPU only "torch" runs (always): no checks
        return "torch"
    if callable(why_not):
        why_not = why_not()
    if choice != "auto":
        reason = why_not[choice]()
        if reason is not None:
            raise ImplUnavailableError(f"vlfast.{op}: impl={choice!r} cannot run here: {reason}")
        return choice
    for name in _AUTO_ORDER:
        if name == "cuda" and not AUTO_PREFERS_CUDA.get(op, False):
            continue
        # The Triton interpreter can run CPU tensors, but only on request: auto keeps to GPUs.
        if name == "triton" and device.type != "cuda":
            continue
        if why_not[name]() is None:
            return name
    raise ImplUnavailableError(f"vlfast.{op}: no implementation can run these inputs: "
                               + "; ".join(f"{n}: {why_not[n]()}" for n in IMPLS))


def op_bodies_may_run_directly(*tensors: torch.Tensor) -> bool:
    """True when nothing needs a torch.library op's boundary, so a public function may run the op's
    Python body itself (under a torch.autograd.Function for gradients): not being compiled or traced,
    no dispatch or function mode active (fake tensors, `with torch.device(...)`, profilers' modes),
    plain tensors. The boundary costs ~30 us per op call and the custom op's own autograd wrapper ~60 us
    more (it rebuilds the schema's arguments each time; torch 2.13, one core), as much as a small CPU
    problem's whole kernel."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0 \
            or torch._C._is_torch_function_mode_enabled():
        return False
    return all(type(t) is torch.Tensor for t in tensors)
