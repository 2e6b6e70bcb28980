"""A CLIP training step: vlfast.models.CLIP + vlfast.nn.ClipLoss against transformers' CLIPModel.

    python -m vlfast bench clip_model [--quick] [--json PATH] [--plot PATH]
    python -m vlfast.bench.bench_clip_model [same options]

One step is forward + backward of both towers and the contrastive loss (gradients into .grad, no
optimizer), under torch.autocast(bfloat16) for bf16 cases, float32 weights. Both models hold the same
weights (vlfast's are loaded from transformers' through vlfast.loaders) and see the same batch:
random pixels, and captions of 8 to 77 tokens right-padded to 77 with an attention mask.

Contenders:
  vlfast-CLIP        vlfast.models.CLIP(...) -> vlfast.nn.ClipLoss
  transformers-sdpa  transformers.CLIPModel(attn_implementation="sdpa")(..., return_loss=True).loss
The error column is the loss's relative error against a float64 forward of transformers' model
(vlfast's, where transformers is not installed). Throughput: images per second = batch / ms * 1000;
TFLOP/s counts the model's matmuls (x3 for forward + backward).
Sizes: on a GPU, ViT-B/16 at batch 256 and 1024 (--quick: 256); on a CPU, the small test configs.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from vlfast.bench.common import FWD_BWD, Case, Contender, import_peer, settings
from vlfast.loaders import clip_from_transformers, transformers_config
from vlfast.models import CLIP, CLIPConfig
from vlfast.nn import ClipLoss

OP = "clip_model"
SHORTEST_CAPTION = 8
REFERENCE_CHUNK = 128  # pairs per float64 forward: bounded memory at batch 1024


def _case(preset: str, batch: int, dtype: torch.dtype) -> Case:
    short = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    return Case(name=f"{preset}-b{batch}-{short}", shape=(batch,), dtype=dtype, params={"preset": preset})


def cases(device: torch.device, size: str) -> list:
    """size: "full" (the issue's goal: ViT-B/16 at 256 and 1024 on a GPU), "quick", or "tiny" (tests)."""
    if size == "tiny":
        return [_case("test-tiny", 8, torch.float32)]
    if device.type != "cuda":
        return [_case("test-small", 16, torch.float32), _case("test-small", 16, torch.bfloat16)]
    return [_case("ViT-B/16", 256, torch.bfloat16)] + ([] if size == "quick" else [_case("ViT-B/16", 1024, torch.bfloat16)])


@dataclass
class Inputs:
    images: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    ours: CLIP
    theirs: Optional[torch.nn.Module]  # transformers' CLIPModel, or None
    theirs_why_not: Optional[str]


def _captions(config: CLIPConfig, batch: int, g: torch.Generator, device: torch.device):
    """Ids (B, context) ending in the largest id (OpenAI's end of text), right-padded with 0, and the mask."""
    s, vocab = config.text.context_length, config.text.vocab_size
    lengths = torch.randint(min(SHORTEST_CAPTION, s), s + 1, (batch,), generator=g)
    ids = torch.randint(1, vocab - 1, (batch, s), generator=g)
    positions = torch.arange(s)[None, :]
    ids = torch.where(positions == lengths[:, None] - 1, vocab - 1, ids)
    mask = positions < lengths[:, None]
    return ids.masked_fill(~mask, 0).to(device), mask.long().to(device)


def _transformers_model(config: CLIPConfig, device: torch.device):
    """(transformers' CLIPModel with SDPA attention and random weights, None) or (None, why not)."""
    transformers, why = import_peer("transformers", "CLIPModel")
    if transformers is None:
        return None, why
    import transformers as tf
    hf_config = tf.CLIPConfig(**transformers_config(config))
    with torch.device(device):
        model = tf.CLIPModel._from_config(hf_config, attn_implementation="sdpa")
    if model.config._attn_implementation != "sdpa" or model.vision_model.config._attn_implementation != "sdpa":
        return None, f"transformers did not take attn_implementation='sdpa' ({model.config._attn_implementation})"
    return model.train(), None


def make_inputs(case: Case, device: torch.device) -> Inputs:
    config = CLIPConfig.preset(case.params["preset"])
    torch.manual_seed(0)
    theirs, why = _transformers_model(config, device)
    if theirs is not None:
        ours = clip_from_transformers(theirs.state_dict(), config)  # the same weights
    else:
        ours = CLIP(config)
    g = torch.Generator().manual_seed(0)
    v = config.vision
    images = torch.randn(case.shape[0], v.channels, v.image_size, v.image_size, generator=g).to(device)
    ids, mask = _captions(config, case.shape[0], g, device)
    return Inputs(images, ids, mask, ours.to(device).train(), theirs, why)


def _vlfast_loss(x: Inputs) -> torch.Tensor:
    return ClipLoss()(*x.ours(x.images, x.ids, x.mask))


def _transformers_loss(x: Inputs) -> torch.Tensor:
    if x.theirs is None:
        raise RuntimeError(x.theirs_why_not)
    return x.theirs(input_ids=x.ids, pixel_values=x.images, attention_mask=x.mask, return_loss=True).loss


def _step(model_of, loss_of, dtype: torch.dtype):
    """run(inputs, mode) for a Contender: one training step's loss (gradients land in .grad)."""
    def run(x: Inputs, mode: str) -> dict:
        model = model_of(x)
        model.zero_grad(set_to_none=True)  # each step allocates its gradients, as the first of a loop does
        with torch.autocast(x.images.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_of(x)
        loss.backward()
        return {"loss": loss.detach().float()}
    return run


def _features64(model, x: Inputs, chunk: slice):
    if isinstance(model, CLIP):
        image, text, _ = model(x.images[chunk].double(), x.ids[chunk], x.mask[chunk])
        return image, text
    out = model(input_ids=x.ids[chunk], pixel_values=x.images[chunk].double(), attention_mask=x.mask[chunk])
    return out.image_embeds, out.text_embeds


def reference(case: Case, x: Inputs, device: torch.device) -> tuple:
    """(float64 loss, how): the features in chunks of REFERENCE_CHUNK pairs, then the dense loss."""
    source = x.theirs if x.theirs is not None else x.ours
    model = copy.deepcopy(source).double().eval()  # a float64 copy: the contenders keep their weights
    n = case.shape[0]
    with torch.no_grad():
        parts = [_features64(model, x, slice(i, i + REFERENCE_CHUNK)) for i in range(0, n, REFERENCE_CHUNK)]
        image = torch.cat([p[0] for p in parts])
        text = torch.cat([p[1] for p in parts])
        scale = source.logit_scale.detach().double().exp()
        logits = scale * image @ text.t()
        labels = torch.arange(n, device=logits.device)
        loss = (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
    del model
    how = "float64 forward of " + ("transformers' CLIPModel" if x.theirs is not None else "vlfast's CLIP")
    return {"loss": loss}, how


def flops(case: Case, mode: str) -> float:
    """Matmul FLOPs of the step: both towers' projections, attention and MLPs, patch embedding; x3 for fwd+bwd."""
    config = CLIPConfig.preset(case.params["preset"])
    total = 0.0
    v, t = config.vision, config.text
    for cfg, tokens in ((v, v.num_positions), (t, t.context_length)):
        per_layer = 2 * tokens * (4 * cfg.width ** 2 + 2 * cfg.width * cfg.mlp_dim) + 4 * tokens ** 2 * cfg.width
        total += cfg.layers * per_layer + 2 * cfg.width * config.embed_dim
    total += 2 * (v.grid ** 2) * v.channels * v.patch_size ** 2 * v.width
    return total * case.shape[0] * (3 if mode == FWD_BWD else 1)


def contenders(case: Case, device: torch.device) -> list:
    autocast = "bfloat16" if case.dtype == torch.bfloat16 else None
    out = [Contender("vlfast-CLIP", _step(lambda x: x.ours, _vlfast_loss, case.dtype),
                     describe=settings(impl="auto", autocast=autocast, weights="float32"))]
    transformers, why = import_peer("transformers", "__version__")
    if why is not None:
        out.append(Contender("transformers-sdpa", skip=why))
    else:
        out.append(Contender("transformers-sdpa", _step(lambda x: x.theirs, _transformers_loss, case.dtype),
                             describe=settings(attn_implementation="sdpa", transformers=transformers,
                                               autocast=autocast, weights="float32", compiled=False)))
    return out


if __name__ == "__main__":
    from vlfast.bench.runner import main
    sys.exit(main([OP] + sys.argv[1:]))
