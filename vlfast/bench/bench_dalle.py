"""vlfast.models.DALLE: a training step and KV-cache sampling against the same model on dense masks / no cache.

    python -m vlfast bench dalle [--quick] [--json PATH]

train-* cases: forward + backward of DALLE.loss (text then image tokens, row / column / conv sparse layers).
  vlfast-DALLE         attention through vlfast.attention with vlfast.masks.dalle (the model as it is)
  sdpa[dense masks]    the same weights, each layer's attention through SDPA with its dense boolean mask
  flex[compiled]       the same, through torch.compile(flex_attention) with a block mask per layer (GPU)
  Error: the loss against the same model in float64 (vlfast's reference attention).
sample-* cases: greedy generation (top_k=1) of every image token for K images of one prompt.
  vlfast-DALLE.generate  the KV cache, each step through vlfast.attention_decode with the layer's mask
  dense-mask cache       the same cache, each step SDPA over the whole cache with rows of the dense mask
  no-cache               the whole sequence recomputed for every new token (the model's own blocks)
  Error: the fraction of image tokens that differ from no-cache's; tokens/s counts image tokens.
"""
from __future__ import annotations

import contextlib
import copy
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlfast.bench.common import FWD, FWD_BWD, Case, Contender, settings
from vlfast.models import DALLE, DALLEConfig

OP = "dalle"


def _case(kind, batch, text_len, grid, dim, layers, heads, vocab, dtype=torch.float32, k=1):
    short = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    name = f"{kind}-{f'b{batch}' if kind == 'train' else f'k{k}'}-t{text_len}-g{grid}-d{dim}x{layers}-{short}"
    return Case(name=name, shape=(batch, text_len + grid * grid, dim), dtype=dtype,
                modes=(FWD_BWD,) if kind == "train" else (FWD,),
                params={"kind": kind, "text_len": text_len, "grid": grid, "dim": dim, "layers": layers,
                        "heads": heads, "vocab": vocab, "k": k})


def cases(device: torch.device, size: str) -> list:
    if size == "tiny":
        return [_case("train", 2, 8, 4, 32, 4, 2, 64), _case("sample", 1, 8, 4, 32, 4, 2, 64, k=2)]
    if device.type != "cuda":
        return [_case("train", 8, 32, 8, 128, 4, 4, 512), _case("sample", 1, 32, 8, 128, 4, 4, 512, k=8)]
    bf16 = torch.bfloat16
    quick = [_case("train", 4, 256, 32, 512, 8, 8, 8192, bf16), _case("sample", 1, 64, 16, 512, 8, 8, 8192, bf16, k=64)]
    if size == "quick":
        return quick
    return quick + [_case("train", 8, 256, 32, 1024, 24, 16, 8192, bf16),  # the 1280 tokens, d 1024, 24 layers
                    _case("sample", 1, 256, 32, 1024, 24, 16, 8192, bf16, k=64)]


@dataclass
class Inputs:
    model: DALLE
    text: torch.Tensor   # (B, T) padded ids
    image: torch.Tensor  # (B, G*G) codes


def make_inputs(case: Case, device: torch.device) -> Inputs:
    p = case.params
    torch.manual_seed(0)
    config = DALLEConfig(text_vocab=p["vocab"], text_len=p["text_len"], image_vocab=p["vocab"], grid=p["grid"],
                         dim=p["dim"], layers=p["layers"], heads=p["heads"], conv_kernel=min(11, 2 * (p["grid"] // 2) + 1))
    model = DALLE(config).to(device=device, dtype=case.dtype)
    batch = case.shape[0]
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(p["text_len"] // 2, p["text_len"] + 1, (batch,), generator=g)
    text = model.pad_text(torch.randint(0, p["vocab"], (batch, p["text_len"]), generator=g), lengths)
    image = torch.randint(0, p["vocab"], (batch, p["grid"] ** 2), generator=g)
    return Inputs(model, text.to(device), image.to(device))


def flops(case: Case, mode: str):
    """Dense-equivalent model FLOPs of the training step: 6 x parameters x tokens (attention not counted)."""
    if case.params["kind"] != "train":
        return None
    p = case.params
    per_layer = 12 * p["dim"] ** 2
    return 6.0 * per_layer * p["layers"] * case.shape[0] * case.shape[1]


def tokens_generated(case: Case) -> int:
    return case.params["k"] * case.params["grid"] ** 2 if case.params["kind"] == "sample" else 0


def _loss(model: DALLE, x: Inputs) -> torch.Tensor:
    return model.loss(x.text, x.image)


def reference(case: Case, x: Inputs, device: torch.device) -> tuple:
    if case.params["kind"] == "sample":
        return {"tokens": _no_cache(x, case)}, "greedy tokens of the model without a cache (the error is the fraction that differ)"
    model = copy.deepcopy(x.model).double()
    for block in model.blocks:
        block.attn.impl = "reference"
    with torch.no_grad():
        return {"loss": _loss(model, x)}, "the same model in float64, vlfast's reference attention"


def compare(outputs: dict, ref: dict) -> dict:
    if "tokens" in outputs:
        return {"tokens": (outputs["tokens"] != ref["tokens"]).double().mean().item()}
    return {"loss": abs(float(outputs["loss"]) - float(ref["loss"])) / max(abs(float(ref["loss"])), 1e-30)}


# --- attention swapped for the peers ----------------------------------------------------------------

@contextlib.contextmanager
def _attention(fn):
    """vlfast.nn.attention's attention() replaced by fn(q, k, v, mask) for the duration (the peers' models)."""
    from vlfast.nn import attention as module
    real = module.attention
    module.attention = lambda q, k, v, mask=None, impl="auto": fn(q, k, v, mask)
    try:
        yield
    finally:
        module.attention = real


def _sdpa_dense(dense: dict):
    def fn(q, k, v, mask):
        key = id(mask)
        if key not in dense:
            dense[key] = mask.to_dense(q.shape[2], k.shape[2]).to(q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense[key])
    return fn


def _flex(blocks: dict):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v, mask):
        key = id(mask)
        if key not in blocks:
            dense = mask.to_dense(q.shape[2], k.shape[2]).to(q.device)
            blocks[key] = create_block_mask(lambda b, h, i, j: dense[i, j], None, None, q.shape[2], k.shape[2],
                                            device=q.device)
        return compiled(q, k, v, block_mask=blocks[key])
    return fn


def _train_runner(attention_fn=None):
    def run(x: Inputs, mode: str) -> dict:
        with (_attention(attention_fn) if attention_fn is not None else contextlib.nullcontext()):
            x.model.zero_grad(set_to_none=True)
            loss = _loss(x.model, x)
            if mode == FWD_BWD:
                loss.backward()
        return {"loss": loss.detach()}
    return run


# --- sampling -----------------------------------------------------------------------------------------

@torch.no_grad()
def _no_cache(x: Inputs, case: Case) -> torch.Tensor:
    """Greedy image tokens for K copies of the first prompt, the whole sequence recomputed per token."""
    model, c = x.model, x.model.config
    text = x.text[:1].repeat(case.params["k"], 1)
    image = torch.zeros(text.shape[0], 0, dtype=torch.long, device=text.device)
    for _ in range(c.image_len):
        h = model.hidden_states(model.embed(text, image))
        image = torch.cat([image, model.image_head(h[:, -1]).argmax(dim=-1, keepdim=True)], dim=1)
    return image


def _generate(x: Inputs, case: Case) -> torch.Tensor:
    return x.model.generate(x.text[:1], num_images=case.params["k"], top_k=1)


def _dense_cache_attend(dense: dict):
    """KVCache.attend for the dense-mask peer: the new keys and values scattered in at seqlens (no host
    sync), then SDPA of the new queries over the whole cache, masked by their rows of the layer's dense
    mask and by the row's length."""
    def attend(self, layer, q, k_new, v_new, mask=None, impl="auto"):
        k_all, v_all = self.k[layer], self.v[layer]  # (B, Hkv, S_max, D), a contiguous cache
        new = self.seqlens.long()[:, None] + torch.arange(k_new.shape[2], device=q.device)  # (B, S_new)
        where = new[:, None, :, None].expand(-1, k_all.shape[1], -1, k_all.shape[3])
        k_all.scatter_(2, where, k_new)
        v_all.scatter_(2, where, v_new)
        key = id(mask)
        if key not in dense:
            # (S, S): DALL-E's masks are the same for every row
            dense[key] = mask.to_dense(self.max_len, self.max_len).reshape(-1, self.max_len, self.max_len)[0].to(q.device)
        keys = torch.arange(self.max_len, device=q.device)
        keep = dense[key][new] & (keys[None, None, :] <= new[:, -1:, None])  # (B, S_new, S_max)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=keep[:, None])
    return attend


def _dense_cache_generate(x: Inputs, case: Case) -> torch.Tensor:
    from vlfast.generation.kv_cache import KVCache
    real = KVCache.attend
    KVCache.attend = _dense_cache_attend(_DENSE_CACHE_MASKS)
    try:
        return _generate(x, case)
    finally:
        KVCache.attend = real


_DENSE_CACHE_MASKS: dict = {}


def contenders(case: Case, device: torch.device) -> list:
    if case.params["kind"] == "sample":
        return [Contender("vlfast-DALLE.generate", lambda x, mode: {"tokens": _generate(x, case)},
                          describe=settings(cache="KVCache", attention="attention_decode auto", sampling="top_k=1")),
                Contender("dense-mask cache", lambda x, mode: {"tokens": _dense_cache_generate(x, case)},
                          describe=settings(cache="KVCache", attention="SDPA over the whole cache, dense mask rows")),
                Contender("no-cache", lambda x, mode: {"tokens": _no_cache(x, case)},
                          describe=settings(cache=None, attention="the model's, the whole sequence per token"))]
    peers = [Contender("vlfast-DALLE", _train_runner(), describe=settings(attention="vlfast.attention auto")),
             Contender("sdpa[dense masks]", _train_runner(_sdpa_dense({})),
                       describe=settings(attention="F.scaled_dot_product_attention, dense bool mask per layer"))]
    if device.type == "cuda":
        peers.append(Contender("flex[compiled]", _train_runner(_flex({})),
                               describe=settings(attention="torch.compile(flex_attention), block mask per layer")))
    else:
        peers.append(Contender("flex[compiled]", skip="FlexAttention's backward needs a GPU here"))
    return peers


if __name__ == "__main__":
    from vlfast.bench.runner import main
    sys.exit(main([OP] + sys.argv[1:]))
