"""vlfast.loaders: transformers and OpenAI-layout CLIP checkpoints in and out, and bad checkpoints out."""
import json
import pickle

import pytest
import torch

from vlfast.loaders import (CheckpointError, clip_from_openai, clip_from_transformers, clip_to_openai,
                            clip_to_transformers, config_from_openai, config_from_transformers, read_state_dict)
from vlfast.models import CLIP, CLIPConfig, TextConfig, VisionConfig

from ..models.common import hf_model, hf_outputs, openai_layout, pixels, text_batch, vlfast_outputs

# Only the parity tests need transformers (the hf fixture skips them without it); the OpenAI-layout,
# head-width and pickle-safety tests run without it.
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


@pytest.fixture(scope="module")
def hf():
    return hf_model()


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(1)
    return pixels(3), *text_batch((12, 5, 16))


def _assert_same_outputs(ours, want, inputs):
    with torch.no_grad():
        for name, g, w in zip(("image", "text", "logits"), vlfast_outputs(ours, *inputs), want):
            torch.testing.assert_close(g, w, **TIGHT, msg=lambda m: f"{name}: {m}")


def _hf_want(hf, inputs):
    with torch.no_grad():
        return hf_outputs(hf, *inputs)


def test_from_save_pretrained_folder_and_file(hf, inputs, tmp_path):
    """A save_pretrained folder (config.json + model.safetensors), then the file alone."""
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    want = _hf_want(hf, inputs)
    for source in (tmp_path, tmp_path / "model.safetensors", str(tmp_path)):
        _assert_same_outputs(clip_from_transformers(source, dtype=torch.float64).eval(), want, inputs)


def test_weights_only_bin_and_dict_with_transformers_config(hf, inputs, tmp_path):
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    want = _hf_want(hf, inputs)
    config = config_from_transformers(hf.config.to_dict())
    assert config == config_from_transformers(hf.config)
    for source in (tmp_path / "pytorch_model.bin", hf.state_dict()):
        _assert_same_outputs(clip_from_transformers(source, config, dtype=torch.float64).eval(), want, inputs)


def test_legacy_position_ids_buffers_are_accepted(hf, inputs):
    state = dict(hf.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    _assert_same_outputs(clip_from_transformers(state, hf.config, dtype=torch.float64).eval(), _hf_want(hf, inputs),
                         inputs)


def test_round_trip_to_transformers(hf, inputs, tmp_path):
    transformers = pytest.importorskip("transformers")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    ours = clip_from_transformers(hf.state_dict(), hf.config, dtype=torch.float64)
    state, config = clip_to_transformers(ours)
    # What it exports saves as safetensors (no shared memory) and loads back as it was.
    safetensors_torch.save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    again = clip_from_transformers(tmp_path, dtype=torch.float64)
    assert again.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))
    back = transformers.CLIPModel(transformers.CLIPConfig(**config, attn_implementation="sdpa")).double().eval()
    back.load_state_dict(state, strict=True)
    assert state.keys() == hf.state_dict().keys()
    for k, v in hf.state_dict().items():
        assert torch.equal(state[k], v), k
    with torch.no_grad():
        for g, w in zip(hf_outputs(back, *inputs), _hf_want(hf, inputs)):
            torch.testing.assert_close(g, w, **TIGHT)


def test_openai_layout_matches_transformers(hf, inputs):
    """in_proj concatenation, transposed projections, QuickGELU: the same outputs as transformers."""
    state = openai_layout(hf.state_dict())
    want = _hf_want(hf, inputs)
    config = config_from_transformers(hf.config)
    _assert_same_outputs(clip_from_openai(state, config, dtype=torch.float64).eval(), want, inputs)
    # The shapes give the config back, with heads from an assumed head width.
    inferred = config_from_openai(state, act="quick_gelu", head_width=8)
    assert (inferred.vision, inferred.text, inferred.embed_dim) == (config.vision, config.text, config.embed_dim)
    # Back out to OpenAI's keys, bit for bit.
    out = clip_to_openai(clip_from_openai(state, config, dtype=torch.float64))
    assert out.keys() == state.keys() and all(torch.equal(out[k], v) for k, v in state.items())


def test_open_clip_training_checkpoint_is_unwrapped(hf, inputs, tmp_path):
    state = {f"module.{k}": v for k, v in openai_layout(hf.state_dict()).items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, tmp_path / "epoch_3.pt")
    model = clip_from_openai(tmp_path / "epoch_3.pt", config_from_transformers(hf.config), dtype=torch.float64)
    _assert_same_outputs(model.eval(), _hf_want(hf, inputs), inputs)


def test_openai_state_dict_without_config():
    """Shapes give the config (with the head width given); the activation is the caller's."""
    config = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=16, patch_size=8, width=64, layers=1, heads=1,
                                                          mlp_dim=96, act="gelu"),
                        text=TextConfig(vocab_size=50, context_length=8, width=64, layers=1, heads=1, mlp_dim=96,
                                        act="gelu"))
    model = CLIP(config).double().eval()
    loaded = clip_from_openai(clip_to_openai(model), act="gelu", head_width=64, dtype=torch.float64).eval()
    assert loaded.config == config
    images, ids = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        for g, w in zip(loaded(images, ids), model(images, ids)):
            torch.testing.assert_close(g, w, **TIGHT)


@pytest.mark.parametrize("name", ["ViT-B/32", "ViT-L/14-336"])
def test_openai_shapes_give_the_preset_back(name):
    with torch.device("meta"):
        state = clip_to_openai(CLIP.from_preset(name))
    assert config_from_openai(state, act="quick_gelu") == CLIPConfig.preset(name)


def test_bad_checkpoint_lists_every_problem(hf):
    state = dict(hf.state_dict())
    del state["text_model.encoder.layers.1.self_attn.k_proj.bias"]
    state["text_model.extra.weight"] = torch.zeros(3)
    state["visual_projection.weight"] = torch.zeros(16, 31, dtype=torch.float64)
    with pytest.raises(CheckpointError) as e:
        clip_from_transformers(state, hf.config)
    message = str(e.value)
    assert "1 missing keys:\n    text_model.encoder.layers.1.self_attn.k_proj.bias" in message
    assert "1 unexpected keys:\n    text_model.extra.weight" in message
    assert ("1 shape mismatches:\n    visual_projection.weight: checkpoint (16, 31), model expects (16, 32) "
            "(for vlfast visual.proj.weight)") in message
    assert e.value.missing == ["text_model.encoder.layers.1.self_attn.k_proj.bias"]
    # The OpenAI layout with a projection stored (out, in): named with the shape it should have.
    oa = openai_layout(hf.state_dict())
    oa["visual.proj"] = oa["visual.proj"].t()
    with pytest.raises(CheckpointError, match=r"visual.proj: checkpoint \(16, 32\), model expects \(32, 16\)"):
        clip_from_openai(oa, config_from_transformers(hf.config))


class _NotATensor:
    pass


def test_files_that_are_not_plain_weights_are_refused(tmp_path):
    pickled = tmp_path / "pickled.bin"
    torch.save({"w": torch.zeros(2), "hook": _NotATensor()}, pickled)
    with pytest.raises(CheckpointError, match=r"cannot be loaded with torch.load\(weights_only=True\): "
                                              r"WeightsUnpickler error: Unsupported global: .*_NotATensor"):
        read_state_dict(pickled)
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump({"w": [1.0]}, f, protocol=2)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(tmp_path / "raw.pkl")
    torch.save({"w": torch.zeros(2), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"not tensors: 'step' \(int\)"):
        read_state_dict(tmp_path / "mixed.pt")
    with pytest.raises(FileNotFoundError, match="holds none of model.safetensors"):
        read_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read_state_dict(tmp_path / "missing.safetensors")


def test_broken_safetensors_file_is_refused(tmp_path):
    pytest.importorskip("safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        read_state_dict(tmp_path / "broken.safetensors")


def test_missing_config_and_activation_are_asked_for(hf):
    with pytest.raises(ValueError, match="config is required"):
        clip_from_transformers(hf.state_dict())
    oa = openai_layout(hf.state_dict())
    with pytest.raises(ValueError, match="act is required without a config: 'quick_gelu' for OpenAI"):
        clip_from_openai(oa)
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        config_from_transformers({"text_config": {"hidden_act": "relu"}})
    with pytest.raises(CheckpointError, match="not an OpenAI-layout CLIP state dict"):
        config_from_openai(hf.state_dict(), act="gelu")


# ---- head widths: not in the weights -------------------------------------------------------------

def _wide_head_clip(seed=0):
    """A CLIP whose vision tower has 80-wide heads (width 320, 4 heads), as open_clip's ViT-H/14: width // 64
    would give 5 heads of 64, and the weights load into that shape without complaint."""
    torch.manual_seed(seed)
    config = CLIPConfig(embed_dim=24, vision=VisionConfig(image_size=24, patch_size=8, width=320, layers=2, heads=4,
                                                          mlp_dim=52, act="gelu"),
                        text=TextConfig(vocab_size=50, context_length=7, width=128, layers=2, heads=2, mlp_dim=36,
                                        act="gelu"))
    model = CLIP(config).double().eval()
    with torch.no_grad():  # fresh random values everywhere, so a wrong head split changes the outputs
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def test_head_width_spec_gives_the_right_heads():
    model = _wide_head_clip()
    state = clip_to_openai(model)
    images, ids = torch.randn(3, 3, 24, 24, dtype=torch.float64), torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        want = model(images, ids)
    for spec in ({"vision_head_width": 80}, {"vision_head_width": 80, "text_head_width": 64}):
        loaded = clip_from_openai(state, act="gelu", dtype=torch.float64, **spec).eval()
        assert loaded.config == model.config, spec
        assert (loaded.config.vision.heads, loaded.config.text.heads) == (4, 2)
        with torch.no_grad():
            for g, w in zip(loaded(images, ids), want):
                torch.testing.assert_close(g, w, **TIGHT)
    # A wrong head split gives other outputs: the check above can tell.
    wrong = clip_from_openai(state, act="gelu", dtype=torch.float64, vision_head_width=64).eval()
    assert wrong.config.vision.heads == 5
    with torch.no_grad():
        assert not torch.allclose(wrong(images, ids)[0], want[0])


def test_width_without_head_spec_is_refused():
    state = clip_to_openai(_wide_head_clip())
    with pytest.raises(ValueError, match=r"vision width 320 is not one of OpenAI's .*vision_head_width"):
        clip_from_openai(state, act="gelu")
    with pytest.raises(ValueError, match="vision_head_width"):
        config_from_openai(state, act="gelu")


@pytest.mark.parametrize("spec, name", [({"vision_head_width": 96}, "vision_head_width"),
                                        ({"vision_head_width": 80, "text_head_width": 48}, "text_head_width"),
                                        ({"head_width": 80}, "head_width")])
def test_head_width_that_does_not_divide_the_width_is_refused(spec, name):
    state = clip_to_openai(_wide_head_clip())
    with pytest.raises(ValueError, match=rf"{name} \(\d+\) does not divide the (vision|text) width"):
        clip_from_openai(state, act="gelu", **spec)


@pytest.mark.parametrize("name, vision_width, vision_heads", [("ViT-H-14", 1280, 16), ("ViT-g-14", 1408, 16),
                                                              ("ViT-bigG-14", 1664, 16)])
def test_open_clip_model_names_give_their_head_widths(name, vision_width, vision_heads):
    # Shapes only (meta tensors): a vision tower as wide as open_clip's, the text tower 64-wide heads.
    config = CLIPConfig(embed_dim=32, vision=VisionConfig(image_size=28, patch_size=14, width=vision_width, layers=1,
                                                          heads=vision_heads, mlp_dim=64, act="gelu"),
                        text=TextConfig(vocab_size=50, context_length=8, width=1024, layers=1, heads=16, mlp_dim=64,
                                        act="gelu"))
    with torch.device("meta"):
        state = clip_to_openai(CLIP(config))
    assert config_from_openai(state, act="gelu", model_name=name) == config
    assert config_from_openai(state, act="gelu", model_name=name + "-quickgelu").vision.heads == vision_heads
    with pytest.raises(ValueError, match=f"vision width {vision_width} is not one of OpenAI's"):
        config_from_openai(state, act="gelu")


def test_model_name_checks():
    state = clip_to_openai(_wide_head_clip())
    with pytest.raises(ValueError, match=r"model_name 'ViT-H-14' has vision width 1280; the checkpoint's is 320"):
        config_from_openai(state, act="gelu", model_name="ViT-H-14")
    with pytest.raises(ValueError, match=r"unknown model_name 'ViT-X-99'; known: .*ViT-bigG-14"):
        config_from_openai(state, act="gelu", model_name="ViT-X-99")
    with pytest.raises(ValueError, match="pass either model_name or head widths"):
        config_from_openai(state, act="gelu", model_name="ViT-H-14", vision_head_width=80)
    with pytest.raises(ValueError, match="pass either config or"):
        clip_from_openai(state, _wide_head_clip().config, vision_head_width=80)
    with pytest.raises(ValueError, match=r"vision_head_width must be a positive int, got 0"):
        config_from_openai(state, act="gelu", vision_head_width=0)
