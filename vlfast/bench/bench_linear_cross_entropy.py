"""vlfast.linear_cross_entropy against PyTorch's materialised logits and the fused peers.

    python -m vlfast bench linear_cross_entropy [--quick] [--json PATH] [--plot PATH]

Peers (each only where it imports; the summary lists the rest):
  torch-naive  F.cross_entropy(F.linear(hidden, weight).float(), targets): bf16 logits, as users write it
  torch-naive[compiled]  the same under torch.compile (dynamic=False, inductor defaults)
  liger        Liger-Kernel's fused linear cross-entropy
  cce          cut-cross-entropy's linear_cross_entropy
Every case has 1 target in 7 ignored (-100), like padded batches. Each peer's row records the settings
it ran with ("config").
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import vlfast
from vlfast.bench.common import (COMPILED, FWD, FWD_BWD, Case, Contender, compiled, import_peer, loss_and_grads,
                                 settings, vlfast_contenders)
from vlfast.ops.linear_cross_entropy import implementation_status

OP = "linear_cross_entropy"
GRADS = ("d_hidden", "d_weight")
IGNORE = -100
# N*H*V above which the slow paths (the fp64 reference for the error columns, vlfast's reference
# impl) are skipped: the GPU script has minutes for everything.
SLOW_WORK_LIMIT = {"cuda": 2**41, "cpu": 2**32}
TOO_SLOW = "too slow at this size for this bench's time budget"


def _case(n, h, v, dtype=torch.bfloat16, modes=(FWD_BWD,), label=""):
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return Case(name=f"{n}x{h}-V{v}-{short}{label}", shape=(n, h, v), dtype=dtype, modes=modes)


def cases(device: torch.device, size: str) -> list:
    """size: "full" (the issue's goal table on a GPU), "quick", or "tiny" (tests)."""
    both = (FWD_BWD, FWD)
    if size == "tiny":
        return [_case(64, 32, 97, torch.float32, both)]
    if device.type != "cuda":
        plan = [_case(256, 256, 32000, torch.float32, both), _case(1024, 512, 4096, torch.float32),
                _case(1024, 512, 4096, torch.bfloat16)]
        return plan if size == "quick" else plan + [_case(2048, 1024, 32000, torch.float32)]
    if size == "quick":
        return [_case(4096, 2048, 32064, modes=both), _case(8192, 4096, 32064)]
    return [_case(4096, 1024, 32064, torch.float32, label="-accuracy"),
            _case(8192, 4096, 32064, modes=both),                       # LLaVA-7B's LM head: the goal row
            _case(8192, 4096, 16384 + 8192, label="-dalle"),             # DALL-E's text + image vocabulary
            _case(8192, 4096, 128256, label="-llama3")]


@dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor

    def leaves(self) -> list:
        return [self.hidden, self.weight]


def make_inputs(case: Case, device: torch.device) -> Inputs:
    """Hidden states of unit scale, a head initialised like an LM's (std 0.02), random targets."""
    n, h, v = case.shape
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=g).to(case.dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=g) * 0.02).to(case.dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    targets[::7] = IGNORE
    return Inputs(hidden, weight, targets)


def _work(case: Case) -> int:
    n, h, v = case.shape
    return n * h * v


def flops(case: Case, mode: str) -> float:
    """The logits GEMM, plus the two gradient GEMMs for fwd+bwd."""
    return 2.0 * _work(case) * (1 if mode == FWD else 3)


def reference(case: Case, x: Inputs, device: torch.device) -> tuple:
    """(fp64 loss and gradients, how), or (None, why there are none)."""
    limit = SLOW_WORK_LIMIT[device.type]
    if _work(case) > limit:
        return None, f"no fp64 reference: N*H*V = {_work(case):.2g} is above this bench's limit {limit:.2g}"
    return oracle(x.hidden, x.weight, x.targets), "fp64 F.cross_entropy(F.linear(...)) by autograd, in row chunks"


ORACLE_ELEMENTS = 1 << 25  # float64 logits per chunk of the oracle (256 MiB)


def oracle(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> dict:
    """Loss (mean over kept rows) and its gradients in plain float64 PyTorch, independent of vlfast:
    each chunk's summed cross-entropy over F.linear's logits, differentiated by autograd."""
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    kept = int((targets != IGNORE).sum())
    rows = max(1, ORACLE_ELEMENTS // weight.shape[0])
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for r0 in range(0, hidden.shape[0], rows):
        part = F.cross_entropy(F.linear(h64[r0:r0 + rows], w64), targets[r0:r0 + rows], ignore_index=IGNORE,
                               reduction="sum") / kept
        part.backward()
        total += part.detach()
    return {"loss": total, "d_hidden": h64.grad, "d_weight": w64.grad}


def _runner(loss_fn):
    return loss_and_grads(loss_fn, Inputs.leaves, GRADS)


def _torch_naive(x: Inputs):
    return F.cross_entropy(F.linear(x.hidden, x.weight).float(), x.targets, ignore_index=IGNORE)


# name -> (module, attribute); both take (hidden, weight, targets) and run on CUDA tensors only
FUSED_PEERS = {
    "liger": ("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy"),
    "cce": ("cut_cross_entropy", "linear_cross_entropy"),
}


def _fused_peer(name: str, device: torch.device) -> Contender:
    if device.type != "cuda":
        return Contender(name, skip="runs on CUDA devices only")
    fn, why = import_peer(*FUSED_PEERS[name])
    if fn is None:
        return Contender(name, skip=why)
    # Both compute the gradient inside the forward: a forward-only time would not compare.
    return Contender(name, _runner(lambda x: fn(x.hidden, x.weight, x.targets, ignore_index=IGNORE)),
                     modes=(FWD_BWD,), describe=settings(call=".".join(FUSED_PEERS[name]), defaults="the peer's own"))


GOAL_SHAPE = (8192, 4096, 32064)
# Chunk budgets tried beside the default on the goal row: the chunk trades extra memory (goal 0.35 GB)
# for the weight-streaming GEMMs' efficiency (goal 9.5 ms); the default is VLFAST_LCE_CHUNK_BYTES.
CHUNK_SWEEP_MIB = (16, 64, 128)


def _vlfast_loss(impl: str):
    return lambda x: vlfast.linear_cross_entropy(x.hidden, x.weight, x.targets, ignore_index=IGNORE, impl=impl)


def _with_chunk_bytes(chunk_bytes: int, loss_fn):
    from vlfast.ops.linear_cross_entropy import triton as tri

    def run(x):
        saved, tri.CHUNK_BYTES = tri.CHUNK_BYTES, chunk_bytes
        try:
            return loss_fn(x)
        finally:
            tri.CHUNK_BYTES = saved
    return run


def _vlfast(case: Case, device: torch.device) -> list:
    status = implementation_status(device, case.dtype)
    rows = vlfast_contenders(status, device, lambda impl: _runner(_vlfast_loss(impl)),
                             TOO_SLOW if _work(case) > SLOW_WORK_LIMIT[device.type] else None)
    if device.type == "cuda" and status.get("triton") is None and case.shape == GOAL_SHAPE:
        rows += [Contender(f"vlfast-triton[chunk {mib} MiB]",
                           _runner(_with_chunk_bytes(mib << 20, _vlfast_loss("triton"))))
                 for mib in CHUNK_SWEEP_MIB]
    return rows


def contenders(case: Case, device: torch.device) -> list:
    naive = {"logits": "input dtype, then .float()", "loss": "F.cross_entropy, mean over kept targets"}
    return (_vlfast(case, device)
            + [Contender("torch-naive", _runner(_torch_naive), describe=settings(**naive, compiled=False)),
               Contender("torch-naive[compiled]", _runner(compiled(_torch_naive)),
                         describe=settings(**naive, compiled=COMPILED))]
            + [_fused_peer(name, device) for name in FUSED_PEERS])


if __name__ == "__main__":
    from vlfast.bench.runner import main
    sys.exit(main([OP] + sys.argv[1:]))
