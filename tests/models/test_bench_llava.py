"""vlfast/bench/bench_llava.py at tiny size: every contender that can run here runs, vlfast's loss is
transformers' (fp32 against float64) and its greedy tokens are transformers'."""
import pytest
import torch

pytest.importorskip("transformers", reason="the benchmark builds transformers' LlavaForConditionalGeneration")

from vlfast.bench import bench_llava as B  # noqa: E402
from vlfast.bench import runner  # noqa: E402


def test_tiny_run_rows():
    rows = []
    runner.run_op(B.OP, B, torch.device("cpu"), "tiny", {}, rows.append)
    ran = {(r["case"].split("-")[0], r["impl"]): r for r in rows}
    for impl in ("vlfast-LLaVA", "transformers[sdpa]"):
        r = ran[("train", impl)]
        assert r["status"] == "ok" and r["mode"] == "fwd+bwd" and r["tokens_per_s"] > 0 and r["config"], r
        assert r["error"] < 1e-5, r  # float32 against transformers' float64 loss
    assert ran[("train", "transformers+liger[sdpa]")]["status"] == "skipped"  # Triton kernels: GPU only
    for impl in ("vlfast-LLaVA.generate", "transformers-generate[sdpa]"):
        r = ran[("gen", impl)]
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["config"], r
        assert r["error"] == 0.0, r  # the same greedy tokens as transformers


def test_liger_patches_apply_to_the_liger_contender_only(monkeypatch):
    """Liger patches transformers' modules, not only the model: a stand-in for apply_liger_kernel_to_llava
    swaps Llama's RoPE function; the Liger step runs it, the plain transformers step afterwards does not."""
    from transformers.models.llama import modeling_llama
    real, calls = modeling_llama.apply_rotary_pos_emb, []

    def rope(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def apply(model):
        modeling_llama.apply_rotary_pos_emb = rope

    peer = B.import_peer
    monkeypatch.setattr(B, "import_peer",
                        lambda module, attr: (apply, None) if module.startswith("liger") else peer(module, attr))
    case = B.cases(torch.device("cpu"), "tiny")[0]
    x = B.make_inputs(case, torch.device("cpu"))
    ours = B._train("liger")(x, "fwd+bwd")["loss"]
    assert calls and modeling_llama.apply_rotary_pos_emb is real
    seen = len(calls)
    theirs = B._train("transformers")(x, "fwd+bwd")["loss"]
    assert len(calls) == seen and torch.equal(ours, theirs)
