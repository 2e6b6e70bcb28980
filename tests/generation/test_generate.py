"""vlfast.generation: the KV-cache loop against recomputing the whole sequence without a cache, on a
tiny causal LM built from vlfast.nn (rotary, GQA); sampling filters; stop tokens; processors; CFG."""
import pytest
import torch
from torch import nn

from vlfast import masks
from vlfast.generation import KVCache, filter_logits, generate, last_positions, sample
from vlfast.nn import SelfAttention

VOCAB, DIM, HEADS, KV_HEADS, LAYERS = 37, 32, 4, 2, 2


class TinyLM(nn.Module):
    def __init__(self, dtype=torch.float64, impl="auto"):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.attn = nn.ModuleList(SelfAttention(DIM, HEADS, num_kv_heads=KV_HEADS, rotary=True, impl=impl)
                                  for _ in range(LAYERS))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(DIM, 64), nn.GELU(), nn.Linear(64, DIM)) for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VOCAB)
        self.to(dtype)

    def forward(self, tokens, cache=None):
        """The whole sequence (cache None, positions 0..S-1), or new tokens stepping with the cache."""
        x = self.embed(tokens)
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            x = x + attn(x, masks.causal(), cache=None if cache is None else cache.layer(i))
            x = x + mlp(x)
        return self.head(x)


class TinyLMLast(TinyLM):
    """TinyLM taking the loop's `last` keyword: logits only at each row's last prompt position."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, tokens, cache=None, last=None):
        self.seen.append(None if last is None else last.tolist())
        x = self.embed(tokens)
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            x = x + attn(x, masks.causal(), cache=None if cache is None else cache.layer(i))
            x = x + mlp(x)
        return self.head(last_positions(x, last))


def _cache(model, batch, max_len, page_size=None):
    p = next(model.parameters())
    return KVCache(LAYERS, batch, KV_HEADS, DIM // HEADS, max_len, page_size=page_size, dtype=p.dtype, device=p.device)


def _prompts():
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 1, 9])
    prompt = torch.randint(1, VOCAB, (3, 9), generator=g)
    for row, n in enumerate(lengths.tolist()):
        prompt[row, n:] = 0
    return prompt, lengths


def _greedy_without_cache(model, prompt, lengths, steps):
    out = []
    for row, n in enumerate(lengths.tolist()):
        seq = prompt[row, :n][None]
        for _ in range(steps):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        out.append(seq[0, n:])
    return torch.stack(out)


@pytest.mark.parametrize("page_size", [None, 4, 1])
@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_greedy_with_the_cache_equals_recomputing_without_it(page_size, impl):
    model = TinyLM(impl=impl)
    prompt, lengths = _prompts()
    with torch.no_grad():
        want = _greedy_without_cache(model, prompt, lengths, 6)
    got, got_lengths = generate(model, prompt, _cache(model, 3, 16, page_size), 6, prompt_lengths=lengths)
    assert torch.equal(got, want) and got_lengths.tolist() == [6, 6, 6]


@pytest.mark.triton
def test_greedy_on_the_triton_kernel_matches_the_torch_path():
    prompt, lengths = _prompts()
    outs = [generate(TinyLM(torch.float32, impl), prompt, _cache(TinyLM(torch.float32), 3, 16, 4), 6,
                     prompt_lengths=lengths)[0] for impl in ("torch", "triton")]
    assert torch.equal(outs[0], outs[1])


def test_stop_tokens_end_a_row_and_pad_after():
    model = TinyLM()
    prompt, lengths = _prompts()
    free, _ = generate(model, prompt, _cache(model, 3, 16), 6, prompt_lengths=lengths)
    stop = int(free[0, 2])
    got, got_lengths = generate(model, prompt, _cache(model, 3, 16), 6, prompt_lengths=lengths, stop_tokens=[stop],
                                pad_token=-1)
    for row in range(3):
        hits = (free[row] == stop).nonzero()
        n = int(hits[0]) + 1 if hits.numel() else 6
        assert got_lengths[row] == n
        assert torch.equal(got[row, :n], free[row, :n]) and (got[row, n:] == -1).all()


def test_a_processor_restricts_the_vocabulary_and_sees_the_tokens_so_far():
    model = TinyLM()
    prompt, lengths = _prompts()
    seen = []

    def image_vocab_only(step, tokens, logits):
        seen.append((step, tuple(tokens.shape)))
        allowed = torch.zeros(VOCAB, dtype=torch.bool)
        allowed[20:30] = True
        return logits.masked_fill(~allowed, float("-inf"))

    got, _ = generate(model, prompt, _cache(model, 3, 16), 5, prompt_lengths=lengths, temperature=1.0,
                      logits_processor=image_vocab_only, generator=torch.Generator().manual_seed(0))
    assert ((got >= 20) & (got < 30)).all()
    assert seen == [(s, (3, s)) for s in range(5)]


def test_classifier_free_guidance_at_scale_one_is_the_conditional_model():
    """uncond + 1 * (cond - uncond) = cond: the guided tokens are the conditional rows' own greedy ones,
    and both halves of the batch take them."""
    model = TinyLM()
    prompt, lengths = _prompts()
    uncond = torch.randint(1, VOCAB, prompt.shape, generator=torch.Generator().manual_seed(5))
    both = torch.cat([prompt, uncond])
    got, _ = generate(model, both, _cache(model, 6, 16), 5, prompt_lengths=torch.cat([lengths, lengths]),
                      cfg_scale=1.0)
    want, _ = generate(model, prompt, _cache(model, 3, 16), 5, prompt_lengths=lengths)
    assert torch.equal(got[:3], want) and torch.equal(got[3:], want)


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all() and torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    # nucleus 0.8: 0.5 + 0.2 < 0.8, so 0.15 joins (0.85 >= 0.8); 0.1 and 0.05 are out
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))[0].tolist()
    assert kept == [True, True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.3))[0].tolist() == [True, False, False, False, False]
    shuffled = logits[:, [3, 0, 4, 2, 1]]  # the filter follows the values, not the order
    assert torch.isfinite(filter_logits(shuffled, top_p=0.8))[0].tolist() == [False, True, False, True, True]


def test_sample_draws_from_the_filtered_softmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])).repeat(20000, 1)
    draws = sample(logits, temperature=1.0, generator=g)
    freq = torch.bincount(draws, minlength=5).double() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64), atol=0.015, rtol=0)
    assert set(sample(logits, 1.0, top_p=0.8, generator=g).tolist()) <= {0, 1, 2}
    assert torch.equal(sample(logits[:3], 1.0, top_k=1, generator=g), torch.zeros(3, dtype=torch.long))
    hot = sample(logits, temperature=100.0, generator=g)  # nearly uniform
    assert torch.bincount(hot, minlength=5).min() > 3000


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=8), "need 17"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(top_k=0), "top_k must be"),
    (dict(top_p=1.5), "top_p must be"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(prompt_lengths=torch.tensor([0, 1, 9])), r"prompt_lengths must lie in \[1, 9\]"),
    (dict(cfg_scale=3.0), "an even number of rows"),
])
def test_bad_arguments_are_named(kwargs, match):
    model = TinyLM()
    prompt, lengths = _prompts()
    args = dict(prompt_lengths=lengths, max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, _cache(model, 3, 16), **args)


def test_a_used_cache_is_refused():
    model = TinyLM()
    prompt, lengths = _prompts()
    cache = _cache(model, 3, 16)
    generate(model, prompt, cache, 2, prompt_lengths=lengths)
    with pytest.raises(ValueError, match="cache is not empty"):
        generate(model, prompt, cache, 2, prompt_lengths=lengths)
    cache.reset()
    generate(model, prompt, cache, 2, prompt_lengths=lengths)


def test_bad_cache_sizes_are_named():
    with pytest.raises(ValueError, match="KVCache: max_len must be an int >= 1"):
        KVCache(2, 3, 2, 8, 0)
    with pytest.raises(ValueError, match="KVCache: page_size must be None or an int >= 1"):
        KVCache(2, 3, 2, 8, 16, page_size=0)
    with pytest.raises(ValueError, match="the cache holds 2 rows but the prompt has 3"):
        model = TinyLM()
        prompt, lengths = _prompts()
        generate(model, prompt, _cache(model, 2, 16), 2, prompt_lengths=lengths)


def test_a_model_taking_last_computes_logits_at_the_prompt_ends_only():
    prompt, lengths = _prompts()
    model = TinyLMLast()
    got, _ = generate(model, prompt, _cache(model, 3, 16), 4, prompt_lengths=lengths)
    want, _ = generate(TinyLM(), prompt, _cache(model, 3, 16), 4, prompt_lengths=lengths)
    assert torch.equal(got, want)
    assert model.seen == [[4, 0, 8], None, None, None]  # the prompt step, then one token per row


def _rows(cache, x, layer):
    """Row b's slots of x (cache.k or cache.v) in position order: (B, Hkv, max_len, D)."""
    if cache.block_table is None:
        return x[layer]
    pages = x[layer][cache.block_table.long()]  # (B, n, Hkv, page, D)
    return pages.permute(0, 2, 1, 3, 4).reshape(pages.shape[0], pages.shape[2], -1, pages.shape[4])


@pytest.mark.parametrize("page_size", [None, 4])
def test_the_cache_holds_zeros_past_every_row(page_size):
    """KVCache's promise to attention_decode (finite_tail): the padding a ragged prompt wrote, and what a
    step wrote past an advance that took fewer tokens, is zeroed; reset() zeroes everything."""
    model = TinyLM()
    prompt, lengths = _prompts()
    cache = _cache(model, 3, 16, page_size)
    generate(model, prompt, cache, 3, prompt_lengths=lengths)
    filled = cache.seqlens.tolist()
    assert filled == [5 + 2, 1 + 2, 9 + 2]  # the last token drawn is not stepped
    for x in (cache.k, cache.v):
        for layer in range(LAYERS):
            rows = _rows(cache, x, layer)
            for row, n in enumerate(filled):
                assert (rows[row, :, :n] != 0).any(dim=-1).all() and not rows[row, :, n:].any()
    with torch.no_grad():  # a step of 2 tokens, advanced by 1: the second is zeroed
        model(torch.ones(3, 2, dtype=torch.int64), cache)
        cache.advance(1)
    for row, n in enumerate(filled):
        rows = _rows(cache, cache.k, 0)
        assert rows[row, :, n].any() and not rows[row, :, n + 1:].any()
    cache.reset()
    assert not cache.k.any() and not cache.v.any() and not cache.seqlens.any()
