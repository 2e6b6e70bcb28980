"""Generation end to end: vlfast.models.Llama.generate (KV cache, vlfast.attention_decode) against
transformers' LlamaForCausalLM.generate (attn_implementation="sdpa") with the same weights.

    python -m vlfast bench generate [--quick] [--json PATH]

Each case: B prompts of P tokens (right-padded to different lengths for vlfast, left-padded for
transformers, as each wants them), N new tokens greedily. The error column is the fraction of generated
tokens that differ from transformers' (0 = the same greedy text); tokens/s = B * N / time.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from vlfast.bench.common import FWD, Case, Contender, import_peer, settings
from vlfast.loaders import llama_from_transformers

OP = "generate"


def _case(b, prompt, new, hidden, layers, heads, kv_heads, vocab, dtype=torch.float32):
    short = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    return Case(name=f"llama-h{hidden}x{layers}-b{b}-p{prompt}-n{new}-{short}", shape=(b, prompt, new), dtype=dtype,
                modes=(FWD,), params={"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads,
                                      "vocab": vocab})


def cases(device: torch.device, size: str) -> list:
    if size == "tiny":
        return [_case(2, 8, 4, 32, 1, 4, 2, 97)]
    if device.type != "cuda":
        return [_case(4, 64, 32, 256, 4, 8, 2, 4096)]
    quick = [_case(8, 512, 128, 2048, 8, 16, 4, 32000, torch.bfloat16)]
    return quick if size == "quick" else quick + [_case(1, 1024, 256, 4096, 8, 32, 8, 32000, torch.bfloat16)]


@dataclass
class Inputs:
    theirs: object               # transformers' model, or None where transformers is absent
    ours: object
    right: torch.Tensor          # (B, P) right-padded prompts
    left: torch.Tensor           # (B, P) the same, left-padded
    left_mask: torch.Tensor
    lengths: torch.Tensor        # (B,)
    new: int


def make_inputs(case: Case, device: torch.device) -> Inputs:
    b, prompt, new = case.shape
    p = case.params
    transformers, why = import_peer("transformers", "LlamaForCausalLM")
    if transformers is None:
        raise RuntimeError(f"this bench builds its model with transformers: {why}")
    from transformers import LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=4 * p["hidden"],
                         num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                         num_key_value_heads=p["kv_heads"], max_position_embeddings=prompt + new,
                         attn_implementation="sdpa")
    theirs = transformers(config).to(device=device, dtype=case.dtype).eval()
    ours = llama_from_transformers({k: v.cpu() for k, v in theirs.state_dict().items()}, config,
                                   dtype=case.dtype).to(device).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(prompt // 2, prompt + 1, (b,), generator=g)
    lengths[0] = prompt
    ids = torch.randint(3, p["vocab"], (b, prompt), generator=g)
    right, left, mask = torch.zeros_like(ids), torch.zeros_like(ids), torch.zeros_like(ids)
    for row, n in enumerate(lengths.tolist()):
        right[row, :n] = ids[row, :n]
        left[row, prompt - n:] = ids[row, :n]
        mask[row, prompt - n:] = 1
    return Inputs(theirs, ours, right.to(device), left.to(device), mask.to(device), lengths.to(device), new)


def _transformers(x: Inputs) -> torch.Tensor:
    out = x.theirs.generate(input_ids=x.left, attention_mask=x.left_mask, max_new_tokens=x.new, min_new_tokens=x.new,
                            do_sample=False, pad_token_id=0)
    return out[:, x.left.shape[1]:]


def _vlfast(x: Inputs) -> torch.Tensor:
    return x.ours.generate(x.right, x.new, prompt_lengths=x.lengths)[0]


def reference(case: Case, x: Inputs, device: torch.device) -> tuple:
    return {"tokens": _transformers(x)}, "transformers' greedy tokens (the error is the fraction that differ)"


def compare(outputs: dict, reference: dict) -> dict:
    return {"tokens": (outputs["tokens"] != reference["tokens"]).double().mean().item()}


def tokens_generated(case: Case) -> int:
    b, _, new = case.shape
    return b * new


def flops(case: Case, mode: str):
    return None


def _runner(fn):
    def run(x: Inputs, mode: str) -> dict:
        with torch.no_grad():
            return {"tokens": fn(x)}
    return run


def contenders(case: Case, device: torch.device) -> list:
    return [Contender("vlfast-Llama.generate", _runner(_vlfast), describe=settings(cache="KVCache, contiguous",
                                                                                    attention="attention_decode auto")),
            Contender("transformers-generate[sdpa]", _runner(_transformers),
                      describe=settings(attn_implementation="sdpa", cache="DynamicCache"))]


if __name__ == "__main__":
    from vlfast.bench.runner import main
    sys.exit(main([OP] + sys.argv[1:]))
