"""vlfast.codebook_lookup and a VectorQuantizer training step against PyTorch and the other peers.

    python -m vlfast bench codebook_lookup [--quick] [--json PATH] [--plot PATH]

Errors (against the float64 argmin and distances of `oracle`, torch.cdist in float64, lowest index on ties): "index_mismatch", the fraction
of rows whose index differs; "distances", max |d - d64| / max |d64|; for the VQ step also the loss and
the gradient of z. Peers (each only where it imports; the summary lists the rest):
  torch-cdist   torch.cdist(z, e).argmin(1) in the input dtype (distance = min^2)
  torch-matmul  (||e||^2 - 2 z @ e.T).argmin(1), the GEMM in the input dtype, the rest fp32
                (cosine: argmax of z @ normalize(e).T)
  torch-fp32-matmul  the same with the GEMM in fp32, TF32 allowed on CUDA (the fastest plain lookup a user writes)
  faiss         faiss.IndexFlatL2 (fp32), on CPU runs
  torch-vq / vector-quantize-pytorch   a VQ step: lookup, gather, commitment loss, EMA, backward
The vq-step cases time forward + backward of an EMA VectorQuantizer (loss + mean of the output).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import vlfast
from vlfast.bench import common
from vlfast.bench.common import vlfast_contenders, FWD, FWD_BWD, Case, Contender, import_peer, settings
from vlfast.nn import VectorQuantizer
from vlfast.ops.codebook_lookup import implementation_status

OP = "codebook_lookup"
COMMITMENT, DECAY = 0.25, 0.99
# N*K*D above which the slow paths (vlfast's reference impl, faiss) are skipped.
SLOW_WORK_LIMIT = {"cuda": 2**41, "cpu": 2**31}
TOO_SLOW = "too slow at this size for this bench's time budget"


def _case(n, k, d, dtype, metric="l2", step=False):
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    name = ("vq-step-" if step else "") + f"{n}x{k}x{d}-{short}" + ("-cosine" if metric == "cosine" else "")
    return Case(name=name, shape=(n, k, d), dtype=dtype, modes=(FWD_BWD,) if step else (FWD,),
                params={"metric": metric, "step": step})


def cases(device: torch.device, size: str) -> list:
    """size: "full" (the issue's goal table on a GPU), "quick", or "tiny" (tests)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    if size == "tiny":
        return [_case(256, 64, 16, fp32), _case(256, 64, 16, fp32, step=True)]
    if device.type != "cuda":
        plan = [_case(4096, 1024, 64, fp32), _case(4096, 1024, 64, bf16), _case(2048, 4096, 256, fp32),
                _case(2048, 1024, 64, fp32, "cosine"), _case(4096, 1024, 64, fp32, step=True)]
        return plan if size == "quick" else plan + [_case(16384, 8192, 256, fp32)]
    goal = _case(65536, 8192, 256, bf16)
    if size == "quick":
        return [goal, _case(65536, 8192, 256, fp32), _case(65536, 8192, 256, bf16, step=True)]
    return [goal, _case(65536, 8192, 256, fp32), _case(65536, 8192, 256, bf16, "cosine"),
            _case(65536, 8192, 256, bf16, step=True), _case(262144, 16384, 64, bf16),
            _case(262144, 16384, 64, fp32), _case(65536, 65536, 256, bf16)]


@dataclass
class Inputs:
    z: torch.Tensor
    codebook: torch.Tensor
    weight: Optional[torch.Tensor] = None  # the VQ step's upstream gradient direction


def make_inputs(case: Case, device: torch.device) -> Inputs:
    """Gaussian z and codebook, as in the peers' measurements (shared/anchors)."""
    n, k, d = case.shape
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(n, d, device=device, generator=g).to(case.dtype)
    codebook = torch.randn(k, d, device=device, generator=g).to(case.dtype)
    return Inputs(z.requires_grad_(case.params["step"]), codebook)


def _work(case: Case) -> int:
    n, k, d = case.shape
    return n * k * d


def flops(case: Case, mode: str) -> float:
    """The distance GEMM, 2 N K D (the step's gather, losses and EMA are O(N D))."""
    return 2.0 * _work(case)


ORACLE_ROWS = 256  # rows per float64 distance block of the oracle


def oracle(z: torch.Tensor, e: torch.Tensor, metric: str) -> tuple:
    """(indices, float64 distances): plain float64 PyTorch, independent of vlfast's lookup code.

    l2: torch.cdist without the matrix-product shortcut (differences, no cancellation), squared;
    cosine: 1 - the float64 cosine similarity. torch.argmin returns the first minimum: ties go to
    the lowest index, as vlfast promises.
    """
    z64, e64 = z.double(), e.double()
    if metric == "cosine":
        z64 = z64 / z64.norm(dim=1, keepdim=True)
        e64 = e64 / e64.norm(dim=1, keepdim=True)
    index, dist = [], []
    for r0 in range(0, z64.shape[0], ORACLE_ROWS):
        rows = z64[r0:r0 + ORACLE_ROWS]
        if metric == "l2":
            d = torch.cdist(rows, e64, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        else:
            d = 1.0 - rows @ e64.T
        best = d.argmin(dim=1)
        index.append(best)
        dist.append(d.gather(1, best[:, None])[:, 0])
    return torch.cat(index), torch.cat(dist)


def reference(case: Case, x: Inputs, device: torch.device) -> tuple:
    """The float64 argmin and distances (the step: its loss and d z too), from `oracle`."""
    z, e = x.z.detach(), x.codebook
    index, distances = oracle(z, e, case.params["metric"])
    out = {"indices": index, "distances": distances}
    if case.params["step"]:
        z64, q = z.double(), e.double()[index]
        out["loss"] = COMMITMENT * ((z64 - q) ** 2).mean()
        out["d_z"] = (1 + 2 * COMMITMENT * (z64 - q)) / z.numel()  # straight-through + commitment
    return out, "fp64 torch.cdist argmin, lowest index on ties (independent of vlfast)"


def compare(outputs: dict, ref: dict) -> dict:
    """index_mismatch: the fraction of rows off the float64 argmin; the rest as relative errors."""
    errors = common.compare({k: v for k, v in outputs.items() if k != "indices"}, ref)
    errors["index_mismatch"] = (outputs["indices"].to(ref["indices"].device) != ref["indices"]).double().mean().item()
    return errors


# --- lookup contenders ---------------------------------------------------------------------------

def _triton_description() -> dict:
    from vlfast.ops.codebook_lookup import triton
    return triton.describe()


def _cuda_description() -> dict:
    from vlfast.ops.codebook_lookup import cuda
    return cuda.describe()


# What a row of each impl records about its call: Triton's autotuned configs, and rows re-scored in float64.
_DESCRIBE = {"triton": _triton_description, "cuda": _cuda_description}


def _vlfast_lookup(case: Case, device: torch.device) -> list:
    metric = case.params["metric"]

    def make_run(impl):
        def run(x: Inputs, mode: str) -> dict:
            index, dist = vlfast.codebook_lookup(x.z, x.codebook, metric=metric, impl=impl)
            return {"indices": index, "distances": dist}
        return run
    too_slow = device.type == "cuda" and _work(case) > SLOW_WORK_LIMIT["cuda"]
    return vlfast_contenders(implementation_status(device, case.dtype), device, make_run,
                             TOO_SLOW if too_slow else None, describe=_DESCRIBE)


def _cdist(x: Inputs, mode: str) -> dict:
    dist, index = torch.cdist(x.z, x.codebook).min(dim=1)
    return {"indices": index, "distances": dist.float() ** 2}


def _matmul(x: Inputs, mode: str) -> dict:
    scores = x.codebook.float().pow(2).sum(1)[None, :] - 2 * (x.z @ x.codebook.T).float()
    best, index = scores.min(dim=1)
    return {"indices": index, "distances": best + x.z.float().pow(2).sum(1)}


def _tf32_matmul(x: Inputs, mode: str) -> dict:
    """The fast user's lookup: ||e||^2 - 2 z.e from an fp32 GEMM, argmin. On CUDA with TF32 matmuls allowed
    (torch.backends.cuda.matmul.allow_tf32, restored after); on a CPU the plain fp32 GEMM."""
    z, e = x.z.float(), x.codebook.float()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = z.is_cuda
    try:
        scores = e.pow(2).sum(1)[None, :] - 2 * (z @ e.T)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    best, index = scores.min(dim=1)
    return {"indices": index, "distances": best + z.pow(2).sum(1)}


def _cosine_matmul(x: Inputs, mode: str) -> dict:
    """Cosine: argmax of z @ normalize(e).T in the input dtype; distance 1 - cos in fp32."""
    best, index = (x.z @ F.normalize(x.codebook, dim=-1).T).float().max(dim=1)
    return {"indices": index, "distances": 1 - best / x.z.float().norm(dim=1)}


def _faiss(case: Case, device: torch.device) -> Contender:
    if device.type == "cuda":
        return Contender("faiss", skip="faiss runs on CPU runs (faiss-gpu is not a peer here)")
    if _work(case) > SLOW_WORK_LIMIT["cpu"]:
        return Contender("faiss", skip=TOO_SLOW)
    index_flat, why = import_peer("faiss", "IndexFlatL2")
    if index_flat is None:
        return Contender("faiss", skip=why)

    def run(x: Inputs, mode: str) -> dict:
        search = index_flat(x.codebook.shape[1])
        search.add(x.codebook.float().numpy())
        dist, index = search.search(x.z.float().numpy(), 1)
        return {"indices": torch.from_numpy(index[:, 0]).long(), "distances": torch.from_numpy(dist[:, 0])}
    faiss, _ = import_peer("faiss", "omp_get_max_threads")
    return Contender("faiss", run, describe=settings(index="IndexFlatL2, rebuilt per call", dtype="float32",
                                                     threads=faiss() if faiss else None))


# --- VQ training step contenders ------------------------------------------------------------------

def _step_runner(module: torch.nn.Module, forward):
    """run(inputs, mode): forward + backward of loss + mean(quantized); module state evolves (EMA)."""
    def run(x: Inputs, mode: str) -> dict:
        z = x.z.detach().requires_grad_()
        quantized, index, loss = forward(module, z)
        (grad,) = torch.autograd.grad(loss + quantized.float().mean(), z)
        return {"indices": index, "loss": loss.detach(), "d_z": grad}
    return run


def _vlfast_step(case: Case, device: torch.device) -> list:
    def make_run(impl):
        holder = {}

        def forward(module, z):
            out = module(z)
            return out.quantized, out.indices, out.loss

        def run(x: Inputs, mode: str) -> dict:
            if "module" not in holder:  # built on first use, from the case's codebook
                vq = VectorQuantizer(x.codebook.shape[0], x.codebook.shape[1], ema_decay=DECAY,
                                     commitment_weight=COMMITMENT, impl=impl).to(x.z.device, x.codebook.dtype)
                vq.codebook.data.copy_(x.codebook)
                vq.embed_avg.copy_(x.codebook)
                holder["module"] = vq.train()
            return _step_runner(holder["module"], forward)(x, mode)
        return run
    return vlfast_contenders(implementation_status(device, case.dtype), device, make_run, describe=_DESCRIBE)


def _torch_step(x: Inputs, mode: str) -> dict:
    """The step in plain PyTorch: matmul + argmin, gather, straight-through, commitment, one-hot-free EMA."""
    z = x.z.detach().requires_grad_()
    e = x.codebook
    with torch.no_grad():
        index = (e.float().pow(2).sum(1)[None, :] - 2 * (z @ e.T).float()).argmin(dim=1)
        counts = torch.bincount(index, minlength=e.shape[0]).float()
        sums = torch.zeros(e.shape, dtype=torch.float32, device=e.device).index_add_(0, index, z.float())
        _ = sums / counts.clamp(min=1)[:, None]  # the EMA's work, without keeping state
    q = e[index]
    loss = COMMITMENT * F.mse_loss(z.float(), q.float())
    quantized = z + (q - z).detach()
    (grad,) = torch.autograd.grad(loss + quantized.float().mean(), z)
    return {"indices": index, "loss": loss.detach(), "d_z": grad}


def _vector_quantize_pytorch(case: Case) -> Contender:
    vq_class, why = import_peer("vector_quantize_pytorch", "VectorQuantize")
    if vq_class is None:
        return Contender("vector-quantize-pytorch", skip=why)
    holder = {}

    def forward(module, z):
        quantized, index, loss = module(z[None])
        return quantized[0], index[0], loss

    def run(x: Inputs, mode: str) -> dict:
        if "module" not in holder:
            k, d = x.codebook.shape
            vq = vq_class(dim=d, codebook_size=k, decay=DECAY, commitment_weight=COMMITMENT, rotation_trick=False)
            vq = vq.to(x.z.device)
            vq._codebook.embed.data.copy_(x.codebook.float()[None])
            vq._codebook.embed_avg.data.copy_(x.codebook.float()[None])
            holder["module"] = vq.train()
        return _step_runner(holder["module"], forward)(x, mode)
    return Contender("vector-quantize-pytorch", run,
                     describe=settings(module=f"VectorQuantize(decay={DECAY}, commitment_weight={COMMITMENT}, "
                                              "rotation_trick=False)", dtype="float32 codebook"))


def contenders(case: Case, device: torch.device) -> list:
    """vlfast's implementations first, then the peers."""
    if case.params["step"]:
        step = settings(lookup="matmul + argmin, GEMM in the input dtype", ema="index_add_ + bincount")
        return _vlfast_step(case, device) + [Contender("torch-step", _torch_step, describe=step),
                                             _vector_quantize_pytorch(case)]
    if case.params["metric"] == "cosine":
        return _vlfast_lookup(case, device) + [Contender("torch-matmul", _cosine_matmul, describe=settings(
            GEMM="input dtype", argmax="float32"))]
    tf32 = device.type == "cuda"
    return _vlfast_lookup(case, device) + [
        Contender("torch-cdist", _cdist, describe=settings(distances="torch.cdist in the input dtype")),
        Contender("torch-matmul", _matmul, describe=settings(GEMM="input dtype", norms_and_argmin="float32")),
        Contender("torch-fp32-matmul[tf32 on CUDA]" if tf32 else "torch-fp32-matmul", _tf32_matmul,
                  describe=settings(GEMM="float32", allow_tf32=tf32)),
        _faiss(case, device)]


if __name__ == "__main__":
    from vlfast.bench.runner import main
    sys.exit(main([OP] + sys.argv[1:]))
