"""vlfast.similarity_topk (exact top-k retrieval) against the searches users write.

    python -m vlfast bench similarity_topk [--quick] [--json PATH] [--plot PATH]

Queries (N, D) and keys (M, D) are unit-norm Gaussian embeddings (CLIP-like), metric "ip". Errors
against the float64 top k (`oracle`: float64 scores in row blocks, a stable sort, ties to the lower
index): "index_mismatch", the fraction of (row, rank) entries whose key differs; "scores", the
largest relative error of the returned scores. Peers (each only where it runs):
  torch-matmul+topk       (q @ k.T).topk(k) in the input dtype, rows in blocks of at most 1 GiB of scores
  torch-fp32-matmul+topk  the same with the GEMM in float32 (TF32 allowed on CUDA)
  faiss                   faiss.IndexFlatIP (float32, exhaustive), on CPU runs
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

import vlfast
from vlfast.bench import common
from vlfast.bench.common import FWD, Case, Contender, import_peer, settings, vlfast_contenders
from vlfast.ops.similarity_topk import implementation_status

OP = "similarity_topk"
SCORE_BLOCK_BYTES = 1 << 30  # the peers' (rows x M) float32 score blocks
ORACLE_BLOCK_BYTES = 1 << 28  # the oracle's float64 blocks


def _case(n, m, d, k, dtype):
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return Case(name=f"{n}x{m}x{d}-k{k}-{short}", shape=(n, m, d, k), dtype=dtype, modes=(FWD,))


def cases(device: torch.device, size: str) -> list:
    """size: "full" (the issue's goal table on a GPU), "quick", or "tiny" (tests)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    if size == "tiny":
        return [_case(64, 500, 16, 5, fp32)]
    if device.type != "cuda":
        plan = [_case(512, 32768, 128, 10, fp32), _case(512, 32768, 128, 10, bf16), _case(512, 32768, 128, 1000, fp32)]
        return plan if size == "quick" else plan + [_case(2048, 262144, 256, 10, fp32)]
    quick = [_case(8192, 262144, 512, 10, bf16), _case(8192, 262144, 512, 4096, bf16)]
    if size == "quick":
        return quick
    return quick + [_case(65536, 1048576, 512, 10, bf16), _case(65536, 1048576, 512, 4096, bf16),
                    _case(50000, 21841, 768, 1, bf16)]  # zero-shot over ImageNet-21k's classes


@dataclass
class Inputs:
    queries: torch.Tensor
    keys: torch.Tensor
    k: int


def make_inputs(case: Case, device: torch.device) -> Inputs:
    n, m, d, k = case.shape
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=g), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(m, d, device=device, generator=g), dim=1)
    return Inputs(q.to(case.dtype), keys.to(case.dtype), k)


def flops(case: Case, mode: str) -> float:
    """The score GEMM, 2 N M D (the selection is O(N M))."""
    n, m, d, _ = case.shape
    return 2.0 * n * m * d


def oracle(q: torch.Tensor, keys: torch.Tensor, k: int) -> tuple:
    """(indices, float64 scores) of each row's k largest float64 inner products, ties to the lower index:
    plain PyTorch, independent of vlfast's code."""
    k64 = keys.double()
    rows = max(1, ORACLE_BLOCK_BYTES // (8 * keys.shape[0]))
    index, score = [], []
    for r0 in range(0, q.shape[0], rows):
        s = q[r0:r0 + rows].double() @ k64.T
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
        index.append(order)
        score.append(s.gather(1, order))
    return torch.cat(index), torch.cat(score)


def reference(case: Case, x: Inputs, device: torch.device) -> tuple:
    index, score = oracle(x.queries, x.keys, x.k)
    return {"indices": index, "scores": score}, "float64 scores, stable sort (ties to the lower index)"


def compare(outputs: dict, ref: dict) -> dict:
    """index_mismatch: the fraction of (row, rank) entries off the float64 top k; scores: relative error."""
    errors = common.compare({"scores": outputs["scores"].to(ref["scores"].device)}, ref)
    errors["index_mismatch"] = (outputs["indices"].to(ref["indices"].device) != ref["indices"]).double().mean().item()
    return errors


def _matmul_topk(gemm_dtype):
    def run(x: Inputs, mode: str) -> dict:
        m = x.keys.shape[0]
        rows = max(1, SCORE_BLOCK_BYTES // (4 * m))
        keys_t = x.keys.to(gemm_dtype).T
        index, score = [], []
        for r0 in range(0, x.queries.shape[0], rows):
            s = x.queries[r0:r0 + rows].to(gemm_dtype) @ keys_t
            top = s.float().topk(x.k, dim=1)
            index.append(top.indices)
            score.append(top.values)
        return {"indices": torch.cat(index), "scores": torch.cat(score)}
    return run


def _tf32(run):
    def wrapped(x: Inputs, mode: str) -> dict:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = x.queries.is_cuda
        try:
            return run(x, mode)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return wrapped


def _faiss(case: Case, device: torch.device) -> Contender:
    if device.type != "cpu":
        return Contender("faiss", skip="faiss runs on CPU runs (faiss-gpu is not a peer here)")
    index_flat, why = import_peer("faiss", "IndexFlatIP")
    if index_flat is None:
        return Contender("faiss", skip=why)
    holder = {}

    def run(x: Inputs, mode: str) -> dict:
        if "index" not in holder:  # built once, untimed after the first call (as a user keeps an index)
            holder["index"] = index_flat(x.keys.shape[1])
            holder["index"].add(x.keys.float().numpy())
        score, index = holder["index"].search(x.queries.float().numpy(), x.k)
        return {"indices": torch.from_numpy(index).long(), "scores": torch.from_numpy(score)}
    return Contender("faiss", run, describe=settings(index="IndexFlatIP, float32, built once"))


def _kernel_description(module: str):
    def describe() -> dict:  # the emit kernel's config, and the last call's fallback / re-scored counts
        import importlib
        return importlib.import_module(f"vlfast.ops.similarity_topk.{module}").describe()
    return describe


_DESCRIBE = {"triton": _kernel_description("triton"), "cuda": _kernel_description("cuda")}


def contenders(case: Case, device: torch.device) -> list:
    def make_run(impl):
        def run(x: Inputs, mode: str) -> dict:
            index, score = vlfast.similarity_topk(x.queries, x.keys, x.k, metric="ip", impl=impl)
            return {"indices": index, "scores": score}
        return run
    tf32 = device.type == "cuda"
    blocks = "rows in blocks of <= 1 GiB of float32 scores"
    return vlfast_contenders(implementation_status(device, case.dtype), device, make_run, describe=_DESCRIBE) + [
        Contender("torch-matmul+topk", _matmul_topk(case.dtype), describe=settings(GEMM="input dtype", scores=blocks)),
        Contender("torch-fp32-matmul+topk[tf32 on CUDA]" if tf32 else "torch-fp32-matmul+topk",
                  _tf32(_matmul_topk(torch.float32)), describe=settings(GEMM="float32", allow_tf32=tf32, scores=blocks)),
        _faiss(case, device)]


if __name__ == "__main__":
    from vlfast.bench.runner import main
    sys.exit(main([OP] + sys.argv[1:]))
