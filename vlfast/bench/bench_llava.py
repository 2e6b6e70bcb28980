"""vlfast.models.LLaVA: a training step and greedy generation against transformers' LlavaForConditionalGeneration.

    python -m vlfast bench llava [--quick] [--json PATH]

All contenders hold the same weights: transformers' randomly initialised model, converted to vlfast's by
vlfast.loaders.llava_from_transformers. One model lives on the device at a time (a 7B model three times
over would not fit); each is built by its contender's first, untimed call.

train-* cases: forward + backward of a batch of B sequences of S tokens, each with one image (T image
tokens) and labels -100 on the prompt and the image tokens (LLaVA-1.5 stage 2: the vision tower frozen,
the projector and the language model trained; gradients into .grad, no optimizer; weights and math in
the case's dtype, no autocast).
  vlfast-LLaVA              LLaVA.loss on the B sequences packed into one (B*S,) row (cu_seqlens), the
                            loss through vlfast.linear_cross_entropy
  transformers[sdpa]        LlavaForConditionalGeneration(attn_implementation="sdpa")(..., labels).loss, (B, S)
  transformers+liger[sdpa]  the same after liger_kernel's apply_liger_kernel_to_llava(model=...) (GPU only)
  Error: |loss - reference| / |reference|, the reference being transformers' loss in float64 (fp32 cases)
  or float32 (bf16 cases). tokens/s = B * S / time; peak = extra memory above the weights.
gen-* cases: B prompts (one image each, text of different lengths), N new tokens greedily.
  vlfast-LLaVA.generate        right-padded prompts, vlfast's KV cache and attention_decode
  transformers-generate[sdpa]  left-padded prompts with an attention mask, DynamicCache
  Error: the fraction of generated tokens that differ from transformers'; tokens/s = B * N / time.
Sizes: on a GPU LLaVA-1.5-7B-shaped (CLIP ViT-L/14-336 -> 576 image tokens, Llama 4096 hidden), bf16,
S = 2048; --quick keeps 8 of its 32 decoder layers ("L8" in the case name). On a CPU a small fp32 config.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from vlfast.bench.common import FWD, FWD_BWD, Case, Contender, free_memory, import_peer, settings
from vlfast.loaders import llava_from_transformers
from vlfast.models.llava_chat import IGNORE_INDEX, pack

OP = "llava"
BOS, PAD = 1, 0

# Model shapes. vision: CLIP tower; text: Llama; image: the placeholder id (inside the vocabulary).
PRESETS = {
    "tiny": dict(vision=dict(image=16, patch=8, width=24, layers=2, heads=2, mlp=48),
                 text=dict(hidden=32, inter=64, layers=2, heads=4, kv_heads=2, vocab=100), image=99),
    "small": dict(vision=dict(image=64, patch=8, width=128, layers=4, heads=4, mlp=512),
                  text=dict(hidden=256, inter=688, layers=4, heads=8, kv_heads=8, vocab=4096), image=4095),
    # llava-hf/llava-1.5-7b-hf's shapes: CLIP ViT-L/14-336 (24 x 24 = 576 patches), Llama-2-7B (Vicuna)
    "llava-1.5-7b": dict(vision=dict(image=336, patch=14, width=1024, layers=24, heads=16, mlp=4096),
                         text=dict(hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, vocab=32064),
                         image=32000),
}


def _case(kind: str, preset: str, batch: int, length: int, dtype=torch.float32, layers: Optional[int] = None,
          new: int = 0) -> Case:
    """kind "train": batch sequences of `length` tokens; "gen": batch prompts of about `length` tokens, `new` more."""
    short = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    p = PRESETS[preset]
    grid = p["vision"]["image"] // p["vision"]["patch"]
    layers = layers or p["text"]["layers"]
    scaled = f"-L{layers}" if layers != p["text"]["layers"] else ""
    tail = f"b{batch}-s{length}" if kind == "train" else f"b{batch}-p{length}-n{new}"
    return Case(name=f"{kind}-{preset}{scaled}-{tail}-img{grid * grid}-{short}", shape=(batch, length, new),
                dtype=dtype, modes=(FWD_BWD,) if kind == "train" else (FWD,),
                params={"kind": kind, "preset": preset, "layers": layers, "image_tokens": grid * grid})


def cases(device: torch.device, size: str) -> list:
    if size == "tiny":
        return [_case("train", "tiny", 2, 24), _case("gen", "tiny", 2, 12, new=4)]
    if device.type != "cuda":
        return [_case("train", "small", 2, 512), _case("gen", "small", 4, 96, new=32)]
    bf16 = torch.bfloat16
    quick = [_case("train", "llava-1.5-7b", 2, 2048, bf16, layers=8),
             _case("gen", "llava-1.5-7b", 8, 640, bf16, layers=8, new=128)]
    if size == "quick":
        return quick
    return quick + [_case("train", "llava-1.5-7b", 2, 2048, bf16),  # the goal size
                    _case("gen", "llava-1.5-7b", 8, 640, bf16, new=128)]


# --- the models -----------------------------------------------------------------------------------------

def _hf_config(case: Case):
    """transformers.LlavaConfig of the case's preset (the decoder cut to case.params["layers"])."""
    import transformers
    p = PRESETS[case.params["preset"]]
    v, t = p["vision"], p["text"]
    vision = transformers.CLIPVisionConfig(hidden_size=v["width"], intermediate_size=v["mlp"],
                                           num_hidden_layers=v["layers"], num_attention_heads=v["heads"],
                                           image_size=v["image"], patch_size=v["patch"])
    length = case.shape[1] + case.shape[2]
    text = transformers.LlamaConfig(vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["inter"],
                                    num_hidden_layers=case.params["layers"], num_attention_heads=t["heads"],
                                    num_key_value_heads=t["kv_heads"], max_position_embeddings=max(4096, length),
                                    bos_token_id=BOS, pad_token_id=PAD)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=p["image"],
                                    vision_feature_layer=-2, vision_feature_select_strategy="default",
                                    image_seq_length=case.params["image_tokens"])


def _transformers(x: "Inputs", dtype: torch.dtype):
    """LlavaForConditionalGeneration(sdpa) on x.device in `dtype`, holding x.weights."""
    from transformers import LlavaForConditionalGeneration
    with torch.device(x.device):
        model = LlavaForConditionalGeneration._from_config(x.hf_config, attn_implementation="sdpa", dtype=dtype)
    model.load_state_dict(x.weights, strict=True)
    # No stop token, as in vlfast's generate: min_new_tokens instead would forbid EOS and change greedy picks
    model.generation_config.eos_token_id = None
    return model


def _vlfast(x: "Inputs"):
    return llava_from_transformers(x.weights, x.hf_config, dtype=x.dtype).to(x.device)


# transformers' modules that Liger-Kernel patches (functions and classes, not only the model instance)
LIGER_PATCHED = ("transformers.models.llama.modeling_llama", "transformers.models.llava.modeling_llava",
                 "transformers.models.clip.modeling_clip", "transformers.loss.loss_utils")
_ABSENT = object()


def _module_vars() -> dict:
    return {name: dict(vars(importlib.import_module(name))) for name in LIGER_PATCHED}


def _set_vars(changes: dict) -> None:
    for name, values in changes.items():
        module = importlib.import_module(name)
        for key, value in values.items():
            if value is _ABSENT:
                delattr(module, key)
            else:
                setattr(module, key, value)


def _liger(x: "Inputs"):
    """(transformers' model with Liger's kernels, the module-level patches Liger made). The patches (its
    RoPE among them) are undone at once and reapplied around each of the Liger contender's steps, so the
    plain transformers contender never runs Liger's code."""
    apply, why = import_peer("liger_kernel.transformers", "apply_liger_kernel_to_llava")
    if apply is None:
        raise RuntimeError(why)
    model = _transformers(x, x.dtype)
    before = _module_vars()
    apply(model=model)
    after = _module_vars()
    patched = {n: {k: after[n].get(k, _ABSENT) for k in set(before[n]) | set(after[n])
                   if before[n].get(k, _ABSENT) is not after[n].get(k, _ABSENT)} for n in LIGER_PATCHED}
    _set_vars({n: {k: before[n].get(k, _ABSENT) for k in keys} for n, keys in patched.items()})
    return model, patched


@contextlib.contextmanager
def _liger_patches(patched: dict):
    original = _module_vars()
    _set_vars(patched)
    try:
        yield
    finally:
        _set_vars({n: {k: original[n].get(k, _ABSENT) for k in keys} for n, keys in patched.items()})


def _freeze_tower(model) -> None:
    """LLaVA-1.5 stage 2 on either implementation: the vision tower frozen, the rest trained."""
    from vlfast.models import LLaVA
    if isinstance(model, LLaVA):
        model.set_training_stage(2)
    else:
        model.requires_grad_(True)
        model.model.vision_tower.requires_grad_(False)
    model.train()


# --- the inputs -----------------------------------------------------------------------------------------

@dataclass
class Inputs:
    hf_config: object
    weights: dict                 # transformers' state dict, on the CPU, in the case's dtype
    device: torch.device
    dtype: torch.dtype
    pixels: torch.Tensor          # (B, 3, H, W), one image per sequence / prompt
    ids: torch.Tensor             # train: (B, S); gen: (B, P) right-padded prompts
    labels: Optional[torch.Tensor] = None   # train: (B, S), -100 but on the answers
    packed: dict = field(default_factory=dict)  # train: pack()'s (T,) input_ids, labels, cu_seqlens, max_seqlen
    left: Optional[torch.Tensor] = None     # gen: (B, P) the prompts left-padded, and their mask
    left_mask: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None  # gen: (B,) prompt lengths
    live: dict = field(default_factory=dict)  # {contender kind: its model}, one at a time


def _model(x: Inputs, kind: str):
    """The contender's model (Liger's: (model, its patches)), built on first use with the vision tower
    frozen; any other contender's model is dropped first."""
    if kind not in x.live:
        x.live.clear()
        free_memory(x.device)
        built = {"vlfast": _vlfast, "transformers": lambda x: _transformers(x, x.dtype), "liger": _liger}[kind](x)
        _freeze_tower(built[0] if kind == "liger" else built)
        x.live[kind] = built
    return x.live[kind]


def _sequence(g: torch.Generator, length: int, image_tokens: int, image_id: int, answer: int) -> tuple:
    """(ids, labels) (length,): BOS, a short prefix, the image's placeholders, a question, `answer` tokens
    (the only labelled ones; 0 for a prompt)."""
    prefix = 4
    question = length - 1 - prefix - image_tokens - answer
    if question < 1:
        raise ValueError(f"a sequence of {length} tokens cannot hold {image_tokens} image tokens and "
                         f"{answer} answer tokens")
    ids = torch.randint(2, image_id, (length,), generator=g)  # text ids avoid BOS, PAD and the image id
    ids[0] = BOS
    ids[1 + prefix:1 + prefix + image_tokens] = image_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[length - answer:] = ids[length - answer:]
    return ids, labels


def make_inputs(case: Case, device: torch.device) -> Inputs:
    transformers, why = import_peer("transformers", "LlavaForConditionalGeneration")
    if transformers is None:
        raise RuntimeError(f"this bench builds its model with transformers: {why}")
    p = PRESETS[case.params["preset"]]
    b, length, new = case.shape
    hf_config = _hf_config(case)
    torch.manual_seed(0)
    with torch.device(device):
        source = transformers._from_config(hf_config, attn_implementation="sdpa", dtype=case.dtype)
    weights = {k: v.detach().cpu().clone() for k, v in source.state_dict().items()}
    del source
    free_memory(device)
    g = torch.Generator().manual_seed(1)
    v = p["vision"]
    pixels = torch.randn(b, 3, v["image"], v["image"], generator=g).to(device=device, dtype=case.dtype)
    x = Inputs(hf_config, weights, device, case.dtype, pixels, ids=None)
    n_image = case.params["image_tokens"]
    if case.params["kind"] == "train":
        rows = [_sequence(g, length, n_image, p["image"], answer=(length - n_image) // 2) for _ in range(b)]
        x.ids = torch.stack([ids for ids, _ in rows]).to(device)
        x.labels = torch.stack([labels for _, labels in rows]).to(device)
        x.packed = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in pack(rows).items()}
        return x
    # prompts of length // 2 .. length tokens, the first the longest
    lengths = torch.randint(max(n_image + 6, length // 2), length + 1, (b,), generator=g)
    lengths[0] = length
    right, left = torch.full((b, length), PAD), torch.full((b, length), PAD)
    mask = torch.zeros(b, length, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        ids, _ = _sequence(g, n, n_image, p["image"], answer=0)
        right[row, :n], left[row, length - n:], mask[row, length - n:] = ids, ids, 1
    x.ids, x.left, x.left_mask, x.lengths = right.to(device), left.to(device), mask.to(device), lengths.to(device)
    return x


# --- the steps --------------------------------------------------------------------------------------------

def _vlfast_loss(x: Inputs) -> torch.Tensor:
    model = _model(x, "vlfast")
    q = x.packed
    return model.loss(q["input_ids"], q["labels"], x.pixels, cu_seqlens=q["cu_seqlens"], max_seqlen=q["max_seqlen"])


def _transformers_loss(model, x: Inputs) -> torch.Tensor:
    return model(input_ids=x.ids, pixel_values=x.pixels, labels=x.labels, use_cache=False).loss


def _train(kind: str):
    """run(inputs, mode) for a training Contender: the step's loss (gradients land in .grad)."""
    def run(x: Inputs, mode: str) -> dict:
        built = _model(x, kind)
        model, patched = built if kind == "liger" else (built, None)
        model.zero_grad(set_to_none=True)  # each step allocates its gradients, as the first of a loop does
        with _liger_patches(patched) if patched else contextlib.nullcontext():
            loss = _vlfast_loss(x) if kind == "vlfast" else _transformers_loss(model, x)
            loss.backward()
        return {"loss": loss.detach().float()}
    return run


def _generate_vlfast(x: Inputs, new: int) -> torch.Tensor:
    model = _model(x, "vlfast").eval()
    return model.generate(x.pixels, x.ids, new, prompt_lengths=x.lengths)[0]


def _generate_transformers(model, x: Inputs, new: int) -> torch.Tensor:
    out = model.eval().generate(input_ids=x.left, attention_mask=x.left_mask, pixel_values=x.pixels,
                                max_new_tokens=new, do_sample=False, pad_token_id=PAD)
    return out[:, x.left.shape[1]:]


def reference(case: Case, x: Inputs, device: torch.device) -> tuple:
    if case.params["kind"] == "gen":
        model = _transformers(x, x.dtype)
        with torch.no_grad():
            tokens = _generate_transformers(model, x, case.shape[2])
        return {"tokens": tokens}, "transformers' greedy tokens (the error is the fraction that differ)"
    wide = torch.float64 if case.dtype == torch.float32 else torch.float32
    model = _transformers(x, wide).eval()
    with torch.no_grad():  # the cross-entropy here: transformers' own casts the logits to float32
        logits = model(input_ids=x.ids, pixel_values=x.pixels.to(wide), use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    del model, logits
    return {"loss": loss}, f"transformers' loss in {str(wide).replace('torch.', '')}"


def compare(outputs: dict, ref: dict) -> dict:
    if "tokens" in outputs:
        return {"tokens": (outputs["tokens"] != ref["tokens"]).double().mean().item()}
    return {"loss": abs(float(outputs["loss"]) - float(ref["loss"])) / max(abs(float(ref["loss"])), 1e-30)}


def tokens_generated(case: Case) -> int:
    """Tokens per call: B * S trained, or B * N generated (the runner's tokens/s column)."""
    b, length, new = case.shape
    return b * length if case.params["kind"] == "train" else b * new


def flops(case: Case, mode: str):
    """Training step matmul FLOPs: 6 x trained parameters (decoder layers, head, projector) x tokens, plus
    2 x vision tower parameters x patches (frozen: forward only). Attention scores not counted."""
    if case.params["kind"] != "train":
        return None
    p = PRESETS[case.params["preset"]]
    v, t = p["vision"], p["text"]
    h, d = t["hidden"], t["hidden"] // t["heads"]
    layer = h * d * (2 * t["heads"] + 2 * t["kv_heads"]) + 3 * h * t["inter"]
    trained = case.params["layers"] * layer + h * t["vocab"] + v["width"] * h + h * h
    tower = v["layers"] * (4 * v["width"] ** 2 + 2 * v["width"] * v["mlp"])
    b, length, _ = case.shape
    return 6.0 * trained * b * length + 2.0 * tower * b * (case.params["image_tokens"] + 1)


def contenders(case: Case, device: torch.device) -> list:
    if case.params["kind"] == "gen":
        new = case.shape[2]
        return [Contender("vlfast-LLaVA.generate", lambda x, mode: {"tokens": _generate_vlfast(x, new)},
                          describe=settings(cache="KVCache, contiguous", attention="attention_decode auto",
                                            prompts="right-padded")),
                Contender("transformers-generate[sdpa]",
                          lambda x, mode: {"tokens": _generate_transformers(_model(x, "transformers"), x, new)},
                          describe=settings(attn_implementation="sdpa", cache="DynamicCache", prompts="left-padded"))]
    out = [Contender("vlfast-LLaVA", _train("vlfast"),
                     describe=settings(batch="packed (T,) with cu_seqlens", loss="linear_cross_entropy",
                                       attention="attention_varlen auto")),
           Contender("transformers[sdpa]", _train("transformers"),
                     describe=settings(attn_implementation="sdpa", batch="(B, S)", compiled=False))]
    apply, why = import_peer("liger_kernel.transformers", "apply_liger_kernel_to_llava")
    if device.type != "cuda":
        why = "Liger-Kernel's Triton kernels need a GPU (Triton on a CPU is only its interpreter)"
    out.append(Contender("transformers+liger[sdpa]", skip=why) if why is not None else
               Contender("transformers+liger[sdpa]", _train("liger"),
                         describe=settings(attn_implementation="sdpa", batch="(B, S)",
                                           liger="apply_liger_kernel_to_llava(model=...) defaults")))
    return out


if __name__ == "__main__":
    from vlfast.bench.runner import main
    sys.exit(main([OP] + sys.argv[1:]))
