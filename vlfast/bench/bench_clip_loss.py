"""vlfast.clip_loss against PyTorch's dense logits and the fused-loss peers, loss and every gradient.

    python -m vlfast bench clip_loss [--quick] [--json PATH] [--plot PATH]
    python -m vlfast.bench.bench_clip_loss [same options]

Peers (each only where it imports; the summary lists the rest):
  torch-dense  logits = scale * img @ txt.T in the input dtype (bf16 logits, as users write it);
               softmax: F.cross_entropy on the logits and their transpose, / 2;
               sigmoid: open_clip's SigLipLoss, -logsigmoid(labels * logits).sum() / N
  torch-dense[compiled]  the same under torch.compile (dynamic=False, inductor defaults)
  inf-cl       inf_cl.cal_flash_loss both directions, / 2 (computes in fp32; D % 256 == 0)
  liger        Liger's fused linear cross-entropy, called twice as a CLIP loss
  cce          cut-cross-entropy's linear_cross_entropy, likewise
logit_scale is the multiplier itself (already exponentiated), as vlfast.clip_loss takes it.
Each peer's row records the settings it ran with ("config").
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import vlfast
from vlfast.bench.common import (COMPILED, FWD, FWD_BWD, Case, Contender, compiled, import_peer, loss_and_grads,
                                 settings, vlfast_contenders)
from vlfast.ops.clip_loss import implementation_status

OP = "clip_loss"
GRADS = ("d_image", "d_text", "d_scale", "d_bias")
CLIP_SCALE = 1 / 0.07  # CLIP's initial temperature
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # SigLIP's initial scale and bias

# Largest N*N*D for the slow paths: the fp64 reference (error columns), vlfast's reference impl and
# inf-cl. On the GPU 2**42 keeps N=65536, D=768 (seconds a call) and skips N=131072, D=1024, where
# each costs 10 s or more a call and the GPU script has minutes for everything.
SLOW_WORK_LIMIT = {"cuda": 2**42, "cpu": 2**33}
TOO_SLOW = "too slow at this size for this bench's time budget"


def _case(kind, n, d, dtype, modes=(FWD_BWD,), scale=None, corr=0.15, label=""):
    if scale is None:
        scale = CLIP_SCALE if kind == "softmax" else SIGLIP_SCALE
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    name = f"{kind}-{n}x{d}-{short}" + (f"-s{scale:g}" if scale not in (CLIP_SCALE, SIGLIP_SCALE) else "") + label
    params = {"kind": kind, "scale": scale, "bias": SIGLIP_BIAS if kind == "sigmoid" else None, "corr": corr}
    return Case(name=name, shape=(n, d), dtype=dtype, modes=modes, params=params)


def cases(device: torch.device, size: str) -> list:
    """size: "full" (the issue's goal table on a GPU), "quick", or "tiny" (tests)."""
    both = (FWD_BWD, FWD)
    bf16, fp32 = torch.bfloat16, torch.float32
    if size == "tiny":
        return [_case("softmax", 64, 32, fp32, both), _case("sigmoid", 64, 32, fp32)]
    if device.type != "cuda":  # small sizes: the reference path and PyTorch on a few cores
        plan = [_case("softmax", 512, 256, fp32, both), _case("softmax", 2048, 512, fp32, both),
                _case("softmax", 2048, 512, bf16),
                _case("softmax", 2048, 512, fp32, scale=100.0, corr=0.5, label="-nearperfect"),
                # why bf16 features keep float32 logits: the peers' bf16 logits fail here
                _case("softmax", 2048, 512, bf16, scale=100.0, corr=0.5, label="-nearperfect"),
                _case("sigmoid", 2048, 512, fp32)]
        return plan if size == "quick" else plan + [_case("softmax", 4096, 512, fp32, both),
                                                    _case("sigmoid", 4096, 512, fp32)]
    # Accuracy at scale 100 (a trained CLIP's), and with near-perfect pairs, where the loss is ~1e-11.
    typical = {dt: _case("softmax", 4096, 512, dt, scale=100.0) for dt in (fp32, bf16)}
    nearperfect = {dt: _case("softmax", 4096, 512, dt, scale=100.0, corr=0.5, label="-nearperfect")
                   for dt in (fp32, bf16)}
    if size == "quick":
        return [typical[bf16], nearperfect[fp32], _case("softmax", 16384, 768, bf16, both),
                _case("sigmoid", 16384, 512, bf16), _case("softmax", 32768, 512, bf16)]
    # Cheapest first: a run cut short by its time limit still has the accuracy rows.
    return [typical[fp32], typical[bf16], nearperfect[fp32], nearperfect[bf16],
            _case("sigmoid", 4096, 512, fp32), _case("sigmoid", 4096, 512, bf16),
            _case("softmax", 16384, 768, bf16, both), _case("sigmoid", 32768, 512, bf16, both),
            _case("softmax", 65536, 512, bf16), _case("softmax", 65536, 768, bf16),
            _case("softmax", 131072, 1024, bf16)]


@dataclass
class Inputs:
    img: torch.Tensor
    txt: torch.Tensor
    scale: torch.Tensor
    bias: Optional[torch.Tensor]

    def leaves(self) -> list:
        return [self.img, self.txt, self.scale] + ([self.bias] if self.bias is not None else [])


def make_inputs(case: Case, device: torch.device) -> Inputs:
    """Unit-norm features; text i = corr * image i + noise, so positives stand out as after training."""
    n, d = case.shape
    p = case.params
    g = torch.Generator(device=device).manual_seed(0)
    img = F.normalize(torch.randn(n, d, device=device, generator=g), dim=-1)
    noise = F.normalize(torch.randn(n, d, device=device, generator=g), dim=-1)
    txt = F.normalize(p["corr"] * img + math.sqrt(1 - p["corr"] ** 2) * noise, dim=-1)
    del noise
    scale, bias = (torch.tensor(v, device=device, dtype=torch.float32, requires_grad=True) if v is not None
                   else None for v in (p["scale"], p["bias"]))
    return Inputs(img.to(case.dtype).requires_grad_(), txt.to(case.dtype).requires_grad_(), scale, bias)


def _work(case: Case) -> int:
    n, d = case.shape
    return n * n * d


def flops(case: Case, mode: str) -> float:
    """Model FLOPs: the logits GEMM, plus the two gradient GEMMs for fwd+bwd (recomputation not counted)."""
    return 2.0 * _work(case) * (1 if mode == FWD else 3)


def reference(case: Case, x: Inputs, device: torch.device) -> tuple:
    """(fp64 loss and gradients, how they were computed), or (None, why there are none)."""
    limit = SLOW_WORK_LIMIT[device.type]
    if _work(case) > limit:
        return None, f"no fp64 reference: N*N*D = {_work(case):.2g} is above this bench's limit {limit:.2g}"
    x64 = Inputs(*(t.detach().double().requires_grad_() if t is not None else None
                   for t in (x.img, x.txt, x.scale, x.bias)))
    loss = oracle(x64.img, x64.txt, x64.scale, x64.bias, case.params["kind"])
    loss.backward()
    leaves = (x64.img, x64.txt, x64.scale) + ((x64.bias,) if x64.bias is not None else ())
    return {"loss": loss.detach(), **dict(zip(GRADS, (t.grad for t in leaves)))}, \
        "fp64 dense loss in margin form, autograd (written in this bench, independent of vlfast)"


def oracle(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias, kind: str) -> torch.Tensor:
    """The mean loss over N x N logits, positives on the diagonal, in plain PyTorch.

    softmax: each direction's cross-entropy written as softplus(logsumexp of the margins z_ij - z_ii
    over j != i), which equals logsumexp(z_i) - z_ii but keeps relative accuracy when the loss is
    ~1e-11 (the near-perfect cases), where the difference of two ~100-sized numbers would not.
    sigmoid: -sum_ij logsigmoid(label_ij * z_ij) / N, label +1 on the diagonal, -1 elsewhere.
    """
    z = scale * a @ b.T + (bias if bias is not None else 0.0)
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    if kind == "sigmoid":
        labels = torch.where(eye, 1.0, -1.0).to(z.dtype)
        return -F.logsigmoid(labels * z).sum() / n
    positive = z.diagonal()
    rows = (z - positive[:, None]).masked_fill(eye, float("-inf"))
    cols = (z - positive[None, :]).masked_fill(eye, float("-inf"))
    return (F.softplus(torch.logsumexp(rows, 1)).mean() + F.softplus(torch.logsumexp(cols, 0)).mean()) / 2


def _runner(loss_fn):
    return loss_and_grads(loss_fn, Inputs.leaves, GRADS)


def _labels(x: Inputs) -> torch.Tensor:
    return torch.arange(x.img.shape[0], device=x.img.device)


def _torch_softmax(x: Inputs):
    logits = x.scale * x.img @ x.txt.t()
    labels = _labels(x)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.t().float(), labels)) / 2


def _torch_sigmoid(x: Inputs):
    # open_clip's SigLipLoss: labels +1 on the diagonal, -1 elsewhere; sum over pairs / N.
    logits = x.scale * x.img @ x.txt.t() + x.bias
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def _two_calls(linear_ce):
    """A CLIP loss from a fused linear cross-entropy: texts as the classes of images, then the reverse."""
    def loss(x: Inputs):
        labels = _labels(x)
        return (linear_ce(x.scale * x.img, x.txt, labels) + linear_ce(x.scale * x.txt, x.img, labels)) / 2
    return loss


def _inf_cl(cal_flash_loss):
    def loss(x: Inputs):
        labels = _labels(x)
        return (cal_flash_loss(x.img, x.txt, labels, x.scale).mean()
                + cal_flash_loss(x.txt, x.img, labels, x.scale).mean()) / 2
    return loss


# name -> (module, attribute, how the attribute becomes a loss); all run on CUDA tensors only.
FUSED_PEERS = {
    "inf-cl": ("inf_cl", "cal_flash_loss", _inf_cl),
    "liger": ("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy", _two_calls),
    "cce": ("cut_cross_entropy", "linear_cross_entropy", _two_calls),
}


def _fused_peer(name: str, case: Case, device: torch.device) -> Contender:
    module, attr, make = FUSED_PEERS[name]
    if device.type != "cuda":
        return Contender(name, skip="runs on CUDA devices only")
    if name == "inf-cl" and case.shape[1] % 256:
        return Contender(name, skip="inf-cl needs the feature dimension to be a multiple of 256")
    if name == "inf-cl" and _work(case) > SLOW_WORK_LIMIT[device.type]:
        return Contender(name, skip=TOO_SLOW)
    fn, why = import_peer(module, attr)
    if fn is None:
        return Contender(name, skip=why)
    # Liger and cce compute the gradient inside the forward: a forward-only time would not compare.
    return Contender(name, _runner(make(fn)), modes=(FWD_BWD,),
                     describe=settings(call=f"{module}.{attr}", defaults="the peer's own"))


def _triton_configs() -> dict:
    from vlfast.ops.clip_loss import triton
    return triton.tuned_configs()


def _vlfast(case: Case, device: torch.device) -> list:
    kind = case.params["kind"]

    def make_run(impl):
        return _runner(lambda x: vlfast.clip_loss(x.img, x.txt, x.scale, x.bias, kind=kind, impl=impl))
    return vlfast_contenders(implementation_status(device, case.dtype), device, make_run,
                             TOO_SLOW if _work(case) > SLOW_WORK_LIMIT[device.type] else None,
                             describe={"triton": _triton_configs})


def _torch_dense(case: Case) -> list:
    """The loss as users write it, eager and compiled."""
    loss = _torch_sigmoid if case.params["kind"] == "sigmoid" else _torch_softmax
    ran_with = {"logits": "input dtype", "loss": "fp32 cross-entropy" if loss is _torch_softmax
                else "logsigmoid in the logits' dtype"}
    return [Contender("torch-dense", _runner(loss), describe=settings(**ran_with, compiled=False)),
            Contender("torch-dense[compiled]", _runner(compiled(loss)), describe=settings(**ran_with, compiled=COMPILED))]


def contenders(case: Case, device: torch.device) -> list:
    """vlfast's implementations first, then the peers that compute this case's loss."""
    if case.params["kind"] == "sigmoid":  # the fused peers have no sigmoid loss
        return _vlfast(case, device) + _torch_dense(case)
    return _vlfast(case, device) + _torch_dense(case) + [_fused_peer(name, case, device) for name in FUSED_PEERS]


if __name__ == "__main__":
    from vlfast.bench.runner import main
    sys.exit(main([OP] + sys.argv[1:]))
