"""vlfast.models.LLaVA against transformers' LlavaForConditionalGeneration (tiny, random, float64, built
locally): logits, loss and gradients, greedy generation, every key layout, the way back, bidirectional
image attention, bad input."""
import pytest
import torch

from vlfast.loaders import llava_from_transformers, llava_to_transformers
from vlfast.loaders.checkpoint import Concatenated
from vlfast.loaders.llava import LAYOUTS, key_map, layout_of

transformers = pytest.importorskip("transformers", reason="parity tests build transformers' LLaVA")
VOCAB = 99
IMAGE = VOCAB  # the image placeholder id, the last of the LM's VOCAB + 1 ids
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _hf(layer=-2, strategy="default", seed=0):
    torch.manual_seed(seed)
    text = transformers.LlamaConfig(vocab_size=VOCAB + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    vision = transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=layer,
        vision_feature_select_strategy=strategy)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(tokens_per_image=4, seed=1):
    """Two rows: row 0 one image, row 1 two images; right-padded text around them."""
    g = torch.Generator().manual_seed(seed)
    n = tokens_per_image
    ids = torch.randint(1, VOCAB, (2, 3 + 2 * n + 3), generator=g)
    ids[0, 1:1 + n] = IMAGE
    ids[1, 1:1 + n] = IMAGE
    ids[1, 2 + n:2 + 2 * n] = IMAGE
    pixels = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    return ids, pixels


@pytest.mark.parametrize("layer", [-2, -1, (-2, -1)])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_logits_equal_transformers(layer, strategy):
    hf = _hf(list(layer) if isinstance(layer, tuple) else layer, strategy)
    ours = llava_from_transformers(hf.state_dict(), hf.config, dtype=torch.float64).eval()
    ids, pixels = _inputs(ours.config.tokens_per_image)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixels), hf(input_ids=ids, pixel_values=pixels).logits, **TIGHT)


def test_loss_and_gradients_equal_float64_cross_entropy_of_transformers_logits():
    hf = _hf()
    ours = llava_from_transformers(hf.state_dict(), hf.config, dtype=torch.float64)
    ids, pixels = _inputs()
    labels = torch.where(ids == IMAGE, -100, ids)
    labels[:, :2] = -100
    logits = hf(input_ids=ids, pixel_values=pixels).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB + 1), labels[:, 1:].reshape(-1))
    want.backward()
    got = ours.loss(ids, labels, pixels)
    got.backward()
    torch.testing.assert_close(got, want, **TIGHT)
    hf_params = dict(hf.named_parameters())
    ours_params = dict(ours.named_parameters())
    for name, entry in key_map(ours.config, layout_of(hf.state_dict())).items():  # q / k / v concatenated
        keys = entry.keys if isinstance(entry, Concatenated) else entry if isinstance(entry, tuple) else (entry,)
        grads = [hf_params[k].grad for k in keys]
        if all(g is None for g in grads):  # the vision tower's last norm: LLaVA reads the states before it
            assert ours_params[name].grad is None, name
            continue
        torch.testing.assert_close(ours_params[name].grad, torch.cat(grads), rtol=1e-9, atol=1e-11, msg=name)


def test_greedy_generation_equals_transformers():
    hf = _hf()
    ours = llava_from_transformers(hf.state_dict(), hf.config, dtype=torch.float64).eval()
    ids, pixels = _inputs()
    lengths = torch.tensor([9, 14])
    right = ids.clone()
    right[0, 9:] = 0
    left = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths.tolist()):
        left[row, ids.shape[1] - n:] = ids[row, :n]
        mask[row, ids.shape[1] - n:] = 1
    want = hf.generate(input_ids=left, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, do_sample=False,
                       pad_token_id=0)[:, ids.shape[1]:]
    got, _ = ours.generate(pixels, right, 6, prompt_lengths=lengths)
    assert torch.equal(got, want)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_key_layout_loads(layout):
    hf = _hf()
    v5 = hf.state_dict()
    renamed = {}
    for key, tensor in v5.items():  # v5 names -> the layout's
        for old_prefix, new_prefix in zip(LAYOUTS["v5"][:3], LAYOUTS[layout][:3]):
            if key.startswith(old_prefix):
                key = new_prefix + key[len(old_prefix):]
                break
        renamed[LAYOUTS[layout][3] if key == "lm_head.weight" else key] = tensor
    assert layout_of(renamed) == layout
    ours = llava_from_transformers(renamed, hf.config, dtype=torch.float64).eval()
    ids, pixels = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixels), hf(input_ids=ids, pixel_values=pixels).logits, **TIGHT)


def test_round_trip_back_to_transformers():
    hf = _hf(layer=[-2, -1])
    ours = llava_from_transformers(hf.state_dict(), hf.config, dtype=torch.float64)
    state, config = llava_to_transformers(ours)
    back = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**config)).double().eval()
    back.load_state_dict(state, strict=True)
    ids, pixels = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, pixel_values=pixels).logits,
                                   hf(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=0)


def test_bidirectional_image_attention_lets_an_image_token_see_the_later_ones():
    """Perturb the merged embedding of row 0's last image token (position 4): the first image token
    (position 1) sees it only with bidirectional image attention; the text before the image never does."""
    hf = _hf()
    outputs = {}
    for mode in ("causal", "bidirectional"):
        model = llava_from_transformers(hf.state_dict(), hf.config, dtype=torch.float64, image_attention=mode).eval()
        ids, pixels = _inputs()
        with torch.no_grad():
            embeds = model.embed(ids, pixels)
            moved = embeds.clone()
            moved[0, 4] += 1.0
            outputs[mode] = [model.language_model(inputs_embeds=e, span_ids=model.span_ids(ids))[0] for e in (embeds, moved)]
    before, after = outputs["causal"]
    torch.testing.assert_close(before[:4], after[:4], rtol=0, atol=0)
    before, after = outputs["bidirectional"]
    assert not torch.allclose(before[1], after[1])
    torch.testing.assert_close(before[0], after[0], rtol=0, atol=0)
    spans = model.span_ids(ids)
    assert spans[1].tolist().count(0) == 4 and spans[1].tolist().count(1) == 4 and spans[0].tolist().count(1) == 0


def test_bidirectional_generation_with_the_cache_equals_recomputing():
    hf = _hf()
    model = llava_from_transformers(hf.state_dict(), hf.config, dtype=torch.float64,
                                    image_attention="bidirectional").eval()
    ids, pixels = _inputs()
    got, _ = model.generate(pixels, ids, 4)
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            nxt = model(seq, pixels)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(got, seq[:, ids.shape[1]:])


def test_bad_input_is_named():
    hf = _hf()
    model = llava_from_transformers(hf.state_dict(), hf.config, dtype=torch.float64)
    ids, pixels = _inputs()
    with pytest.raises(ValueError, match="hold 12 image tokens but the 2 images give 2 x 4 = 8"):
        model(ids, pixels[:2])
    with pytest.raises(ValueError, match="but no pixel_values were given"):
        model(ids)
    with pytest.raises(ValueError, match=r"image must be \(B, 3, 16, 16\)"):
        model(ids, torch.randn(3, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="vision feature layers must index the 3 states"):
        model.vision_tower.layer_states(pixels, (-4,))


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_packed_conversations_equal_running_them_one_by_one(mode):
    hf = _hf()
    model = llava_from_transformers(hf.state_dict(), hf.config, dtype=torch.float64, image_attention=mode).eval()
    ids, pixels = _inputs()
    first, second = ids[0, :9], ids[1]  # one image, then two
    packed = torch.cat([first, second])
    cu = torch.tensor([0, 9, 9 + len(second)], dtype=torch.int32)
    with torch.no_grad():
        got = model(packed, pixels, cu_seqlens=cu, max_seqlen=len(second))
        torch.testing.assert_close(got[:9], model(first[None], pixels[:1])[0], **TIGHT)
        torch.testing.assert_close(got[9:], model(second[None], pixels[1:])[0], **TIGHT)
    labels = torch.where(packed == IMAGE, -100, packed)
    loss = model.loss(packed, labels, pixels, cu_seqlens=cu, max_seqlen=len(second))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("stage", [1, 2])
def test_training_stages_freeze_what_the_recipe_freezes(stage):
    hf = _hf()
    model = llava_from_transformers(hf.state_dict(), hf.config, dtype=torch.float64)
    model.set_training_stage(stage)
    ids, pixels = _inputs()
    model.loss(ids, torch.where(ids == IMAGE, -100, ids), pixels).backward()
    for name, p in model.named_parameters():
        trained = name.startswith("projector.") or (stage == 2 and name.startswith("language_model."))
        assert (p.grad is not None) == trained, name
    with pytest.raises(ValueError, match="stage must be 1"):
        model.set_training_stage(3)
