"""vlfast.models.Llama against transformers' LlamaForCausalLM (tiny, random, float64, built locally):
logits, loss and every parameter gradient, greedy generation, the loader both ways, packed batches."""
import pytest
import torch

from vlfast.loaders import CheckpointError, llama_from_transformers, llama_to_transformers
from vlfast.loaders.llama import key_map
from vlfast.models import Llama, LlamaConfig

transformers = pytest.importorskip("transformers", reason="parity tests build transformers' LlamaForCausalLM")
VOCAB = 99
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
SCALINGS = {"default": None, "linear": {"rope_type": "linear", "factor": 2.0},
            "dynamic": {"rope_type": "dynamic", "factor": 2.0},
            "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8}}


def _hf(seed=0, scaling=None, **kw):
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=16, rope_scaling=scaling, attn_implementation="sdpa")
    config.update(kw)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).double().eval()
    with torch.no_grad():  # norms start at 1, biases at 0: make every weight count
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _pair(**kw):
    hf = _hf(**kw)
    return hf, llama_from_transformers(hf.state_dict(), hf.config, dtype=torch.float64).eval()


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_logits_equal_transformers_for_every_rope_scaling(scaling):
    """30 tokens: past max_position_embeddings (16), where dynamic NTK changes the base."""
    hf, ours = _pair(scaling=SCALINGS[scaling])
    ids = torch.randint(0, VOCAB, (3, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, **TIGHT)


@pytest.mark.parametrize("kw", [dict(tie_word_embeddings=True), dict(attention_bias=True, mlp_bias=True),
                                dict(head_dim=16, num_key_value_heads=1), dict(num_key_value_heads=4, rope_theta=500.0)])
def test_logits_equal_transformers_for_config_variants(kw):
    hf, ours = _pair(**kw)
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, **TIGHT)
    assert ours.config.tie_word_embeddings == bool(kw.get("tie_word_embeddings"))
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed.weight


def test_padding_mask_matches_transformers_on_real_tokens():
    hf, ours = _pair()
    ids = torch.randint(0, VOCAB, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **TIGHT)


def _hf_grads(hf, config):
    """transformers' gradients under vlfast's names (q, k, v concatenated), through the key map."""
    grads = {k: p.grad for k, p in hf.named_parameters()}
    grads.setdefault("lm_head.weight", grads.get("model.embed_tokens.weight"))
    out = {}
    for ours, entry in key_map(config).items():
        keys = entry.keys if hasattr(entry, "keys") else (entry,)
        out[ours] = torch.cat([grads[k] for k in keys]) if len(keys) > 1 else grads[keys[0]]
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_loss_and_every_gradient_equal_transformers(tied):
    hf, ours = _pair(tie_word_embeddings=tied)
    ids = torch.randint(0, VOCAB, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100  # no loss on a prompt
    labels[1, 9:] = -100
    # transformers' own loss upcasts the logits to float32; the float64 cross-entropy of its float64 logits:
    logits = hf(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(want.float(), hf(input_ids=ids, labels=labels).loss, rtol=1e-6, atol=0)
    want.backward()
    got = ours.loss(ids, labels)
    got.backward()
    torch.testing.assert_close(got, want, **TIGHT)
    hf_grads = _hf_grads(hf, ours.config)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[name], rtol=1e-9, atol=1e-11, msg=name)


def test_packed_batch_equals_the_sequences_one_by_one():
    _, ours = _pair()
    seqs = [torch.randint(0, VOCAB, (n,)) for n in (5, 1, 8)]
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
    packed = torch.cat(seqs)
    with torch.no_grad():
        logits = ours(packed, cu_seqlens=cu, max_seqlen=8)
        for seq, (a, b) in zip(seqs, ((0, 5), (5, 6), (6, 14))):
            torch.testing.assert_close(logits[a:b], ours(seq[None])[0], **TIGHT)
    labels = packed.clone()
    loss = ours.loss(packed, labels, cu_seqlens=cu, max_seqlen=8)
    # the same tokens' losses, sequence by sequence (weighted by their predicted tokens)
    total = sum(ours.loss(s[None], s[None]) * (len(s) - 1) for s in seqs if len(s) > 1)
    torch.testing.assert_close(loss, total / sum(len(s) - 1 for s in seqs), **TIGHT)


@pytest.mark.parametrize("page_size", [None, 4])
def test_greedy_generation_equals_transformers(page_size):
    hf, ours = _pair()
    lengths = torch.tensor([6, 2, 9])
    prompt = torch.randint(3, VOCAB, (3, 9))
    right = prompt.clone()
    left = torch.zeros_like(prompt)
    mask = torch.zeros_like(prompt)
    for row, n in enumerate(lengths.tolist()):
        right[row, n:] = 0
        left[row, 9 - n:] = prompt[row, :n]
        mask[row, 9 - n:] = 1
    want = hf.generate(input_ids=left, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)[:, 9:]
    got, got_lengths = ours.generate(right, 7, prompt_lengths=lengths, page_size=page_size)
    assert torch.equal(got, want) and got_lengths.tolist() == [7, 7, 7]


def test_round_trip_back_to_transformers():
    hf, ours = _pair(tie_word_embeddings=False, scaling=SCALINGS["llama3"])
    state, config = llama_to_transformers(ours)
    back = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, attn_implementation="sdpa")).double()
    missing, unexpected = back.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=0, atol=0)


def test_loads_a_sharded_safetensors_folder(tmp_path):
    pytest.importorskip("safetensors")
    hf = _hf()
    hf.save_pretrained(tmp_path, max_shard_size="20KB", safe_serialization=True)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = llama_from_transformers(tmp_path, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, **TIGHT)


def test_checkpoint_errors_list_every_problem():
    hf = _hf()
    state = dict(hf.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 32)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        llama_from_transformers(state, hf.config)
    text = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in text and "extra.weight" in text
    assert "model.layers.0.self_attn.k_proj.weight: checkpoint (3, 32), model expects (16, 32)" in text


def test_bad_inputs_and_configs_are_named():
    _, ours = _pair()
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=99\)"):
        ours(torch.tensor([[1, 99]]))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        ours(torch.tensor([[1]]), inputs_embeds=torch.zeros(1, 1, 32))
    with pytest.raises(ValueError, match="attention_mask must be"):
        ours(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="num_kv_heads must divide num_heads"):
        LlamaConfig(hidden_size=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_type must be one of"):
        Llama(LlamaConfig(vocab_size=9, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                          rope_scaling={"rope_type": "yarn", "factor": 2.0}))
