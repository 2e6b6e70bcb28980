"""LLaMA: a decoder-only transformer from vlfast.nn, the language model of LLaVA.

    ids (B, S) -> embed -> [x + attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] x L -> RMSNorm -> hidden (B, S, H)
    logits = lm_head(hidden); loss = vlfast.linear_cross_entropy on the shifted labels (no (tokens x vocab)
    logits in training)

Attention is vlfast.nn.SelfAttention with grouped-query heads and LLaMA's rotary embedding (rope_theta,
rope_scaling), causal, with a key padding mask, over packed sequences (cu_seqlens), or stepping with a
vlfast.generation.KVCache. Parameter names follow the layers' roles; vlfast.loaders maps transformers'
LlamaForCausalLM checkpoints onto them and back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import masks
from ..generation import KVCache, generate as generate_tokens, last_positions
from ..nn import LlamaRotaryEmbedding, RMSNorm, SelfAttention
from ..nn.attention import packed_positions
from ..ops.linear_cross_entropy import linear_cross_entropy
from ._config import check_positive

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LlamaConfig:
    """transformers' LlamaConfig fields (num_hidden_layers -> num_layers, num_attention_heads -> num_heads)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None            # None: num_heads (no grouping)
    head_dim: Optional[int] = None                # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = field(default=None, hash=False)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        check_positive("LlamaConfig", self)
        kv = self.kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or self.num_heads % kv:
            raise ValueError(f"LlamaConfig.num_kv_heads must divide num_heads ({self.num_heads}), got {self.num_kv_heads!r}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"LlamaConfig.hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                             f"({self.num_heads}), or give head_dim")
        if self.dim_per_head % 2:
            raise ValueError(f"LlamaConfig: the head dim must be even (rotary), got {self.dim_per_head}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError("LlamaConfig.rms_norm_eps and rope_theta must be > 0")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, rotary: LlamaRotaryEmbedding):
        super().__init__()
        c = config
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = SelfAttention(c.hidden_size, c.num_heads, num_kv_heads=c.kv_heads, head_dim=c.dim_per_head,
                                  bias=c.attention_bias, rotary=rotary)
        self.post_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, c.mlp_bias)

    def forward(self, x: Tensor, mask: masks.Mask, **attend) -> Tensor:
        x = x + self.attn(self.input_norm(x), mask, **attend)
        return x + self.mlp(self.post_norm(x))


class Llama(nn.Module):
    """LlamaForCausalLM: the decoder and its LM head."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        # one rotary embedding (no parameters) for every layer: its rotation is computed once per forward
        self.rotary = LlamaRotaryEmbedding(c.dim_per_head, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
        self.layers = nn.ModuleList(DecoderLayer(c, self.rotary) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    # --- the decoder --------------------------------------------------------------------------------
    def _check_ids(self, ids: Tensor) -> None:
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, S) int64 token ids, got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        if not torch.compiler.is_compiling() and ids.numel():  # an id outside the table would index out of bounds
            low, high = (int(x) for x in torch.stack([ids.min(), ids.max()]).tolist())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got {low} .. {high}")

    def hidden_states(self, input_ids: Optional[Tensor] = None, *, inputs_embeds: Optional[Tensor] = None,
                      attention_mask: Optional[Tensor] = None, positions: Optional[Tensor] = None,
                      cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                      cache: Optional[KVCache] = None, span_ids: Optional[Tensor] = None) -> Tensor:
        """The final-norm hidden states (B, S, H), or (T, H) for packed input (cu_seqlens).

        input_ids (B, S) or inputs_embeds (B, S, H) (LLaVA's merged text and image features; packed:
        (T,) / (T, H)). attention_mask (B, S): 1 for tokens, 0 for padding (keys never attended).
        positions: (B, S) or (S,) (default 0..S-1; packed: restarting per sequence). cache: step with a
        KVCache (new tokens at cache positions; attention_mask must be None). span_ids (B, S) (with a cache:
        (B, cache.max_len)): tokens of one span (id >= 0) see each other (vlfast.masks.spans), else causal.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            self._check_ids(input_ids if cu_seqlens is None else input_ids[None])
            x = self.embed(input_ids)
        else:
            x = inputs_embeds
        if x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must have last dimension {self.config.hidden_size}, got {tuple(x.shape)}")
        mask = masks.causal() if span_ids is None else masks.spans(span_ids)
        if cache is not None:
            if attention_mask is not None or cu_seqlens is not None:
                raise ValueError("with a cache, pass neither attention_mask nor cu_seqlens (the cache holds the lengths)")
            positions = cache.positions(x.shape[1]) if positions is None else positions
            rotation = self.rotary.rotation(positions, x.dtype)
            for i, layer in enumerate(self.layers):
                x = layer(x, mask, cache=cache.layer(i), rotation=rotation)
            return self.norm(x)
        if attention_mask is not None:
            if attention_mask.shape != x.shape[:2]:
                raise ValueError(f"attention_mask must be {tuple(x.shape[:2])}, got {tuple(attention_mask.shape)}")
            mask = mask & masks.key_padding(attention_mask.to(device=x.device, dtype=torch.bool))
        if positions is None:  # 0..S-1, or restarting at each packed sequence
            positions = torch.arange(x.shape[1], device=x.device) if cu_seqlens is None else \
                packed_positions(cu_seqlens, x.shape[0])
        attend = dict(rotation=self.rotary.rotation(positions, x.dtype, packed=cu_seqlens is not None))
        if cu_seqlens is not None:
            attend.update(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        for layer in self.layers:
            x = layer(x, mask, **attend)
        return self.norm(x)

    def forward(self, input_ids: Optional[Tensor] = None, **kwargs) -> Tensor:
        """Logits (B, S, V) (float32 math as the head's dtype gives it): hidden_states' arguments."""
        return self.lm_head(self.hidden_states(input_ids, **kwargs))

    def loss(self, input_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None, **kwargs) -> Tensor:
        """Mean next-token cross-entropy: position t predicts labels[t + 1] (-100 ignored), through
        vlfast.linear_cross_entropy (the logits are never materialised)."""
        if labels is None:
            raise ValueError("loss needs labels (B, S) (or (T,) packed), -100 where no loss is taken")
        hidden = self.hidden_states(input_ids, **kwargs)
        h = hidden.shape[-1]
        if kwargs.get("cu_seqlens") is not None:  # packed: no prediction across a sequence boundary
            cu = kwargs["cu_seqlens"].long()
            target = torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])
            target[cu[1:] - 1] = IGNORE_INDEX
            return linear_cross_entropy(hidden, self.lm_head.weight, target, ignore_index=IGNORE_INDEX)
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return linear_cross_entropy(hidden.reshape(-1, h), self.lm_head.weight, target.reshape(-1),
                                    ignore_index=IGNORE_INDEX)

    # --- generation -------------------------------------------------------------------------------------
    def step(self, tokens: Tensor, cache: KVCache, last: Optional[Tensor] = None, **kwargs) -> Tensor:
        """One generation step: tokens (B, S_new) -> logits (B, S_new, V), or (B, 1, V) at the positions
        last (B,); the caller advances the cache. kwargs: hidden_states' (inputs_embeds, span_ids)."""
        return self.lm_head(last_positions(self.hidden_states(tokens, cache=cache, **kwargs), last))

    def new_cache(self, batch: int, max_len: int, page_size: Optional[int] = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.config.num_layers, batch, self.config.kv_heads, self.config.dim_per_head, max_len,
                       page_size=page_size, dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, prompt_lengths: Optional[Tensor] = None,
                 page_size: Optional[int] = None, **sampling) -> tuple[Tensor, Tensor]:
        """(tokens (B, max_new_tokens), lengths (B,)) from right-padded prompts, with a fresh KV cache;
        sampling: vlfast.generation.generate's options (temperature, top_k, top_p, stop_tokens, ...)."""
        longest = prompt.shape[1] + max_new_tokens
        cache = self.new_cache(prompt.shape[0], longest, page_size)
        return generate_tokens(self.step, prompt, cache, max_new_tokens, prompt_lengths=prompt_lengths, **sampling)
