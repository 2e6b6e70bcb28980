"""generate: the sampling loop LLaVA and DALL-E share, over any model that steps with a KVCache.

A model is a callable model(tokens (B, S_new) int64, cache) -> logits (B, S_new, V): its attention layers
call cache.attend(layer, ...) and take their positions from cache.positions(S_new); the loop advances the
cache after each call. A model that also takes a keyword `last` ((B,) int64 or None) gets, on the prompt
step, each row's last prompt position, and returns only the logits there, (B, 1, V) (last_positions): the
loop reads no others, and the LM head then runs on B positions instead of B x S. Prompts are right-padded
(B, S) with their lengths; the padding is written into the cache but never attended (each row's length
stops before it) and the first generated token overwrites it.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .kv_cache import KVCache
from .sampling import check_sampling, sample

# logits_processor(step, tokens so far (B, step), logits (B, V)) -> logits (B, V)
LogitsProcessor = Callable[[int, Tensor, Tensor], Tensor]


def last_positions(hidden: Tensor, last: Optional[Tensor]) -> Tensor:
    """hidden (B, S, H) -> (B, 1, H) at each row's position last[b] (all of it when last is None)."""
    if last is None:
        return hidden
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last][:, None]


def _takes_last(model: Callable) -> bool:
    try:  # a module's call signature is (*args, **kwargs): read its forward's
        return "last" in inspect.signature(model.forward if isinstance(model, torch.nn.Module) else model).parameters
    except (TypeError, ValueError):  # a callable without a readable signature
        return False


def _check(prompt: Tensor, prompt_lengths: Tensor, max_new_tokens: int, cache: KVCache, cfg_scale) -> None:
    if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"generate: prompt must be (B, S) int64 token ids, got "
                         f"{getattr(prompt, 'dtype', type(prompt).__name__)} {tuple(getattr(prompt, 'shape', ()))}")
    b, s = prompt.shape
    if prompt_lengths.shape != (b,) or prompt_lengths.is_floating_point():
        raise ValueError(f"generate: prompt_lengths must be ({b},) integers, got {prompt_lengths.dtype} "
                         f"{tuple(prompt_lengths.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if cache.batch != b:
        raise ValueError(f"generate: the cache holds {cache.batch} rows but the prompt has {b}")
    if cfg_scale is not None and b % 2:
        raise ValueError(f"generate: cfg_scale needs the batch as [conditional rows; unconditional rows], an even "
                         f"number of rows, got {b}")
    # The one host sync before the loop: every row's prompt and new tokens fit the cache.
    shortest, longest, filled = (int(x) for x in torch.stack([prompt_lengths.min(), prompt_lengths.max(),
                                                              cache.seqlens.max().to(prompt_lengths.dtype)]).tolist())
    if shortest < 1 or longest > s:
        raise ValueError(f"generate: prompt_lengths must lie in [1, {s}], got {shortest} .. {longest}")
    if filled:
        raise ValueError("generate: the cache is not empty (cache.reset() first)")
    if max(s, longest + max_new_tokens) > cache.max_len:
        raise ValueError(f"generate: the cache holds {cache.max_len} tokens per row but the prompt ({s} padded) and "
                         f"{max_new_tokens} new tokens need {max(s, longest + max_new_tokens)}")


@torch.no_grad()
def generate(model: Callable[[Tensor, KVCache], Tensor], prompt: Tensor, cache: KVCache, max_new_tokens: int, *,
             prompt_lengths: Optional[Tensor] = None, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, stop_tokens: Sequence[int] = (), pad_token: int = 0,
             logits_processor: Optional[LogitsProcessor] = None, cfg_scale: Optional[float] = None,
             generator: Optional[torch.Generator] = None, sync_every: int = 16) -> tuple[Tensor, Tensor]:
    """(tokens (B, max_new_tokens), lengths (B,)): each row's new tokens, up to and including its first
    stop token, then pad_token; lengths counts them.

    prompt (B, S) right-padded ids with prompt_lengths (B,) (default: all S). temperature 0 is greedy;
    top_k / top_p filter the distribution. logits_processor(step, tokens, logits) may change the next
    token's logits (e.g. restrict them to a vocabulary range). cfg_scale: classifier-free guidance, the
    batch being [conditional rows; unconditional rows]: both halves take the token drawn from
    uncond + cfg_scale * (cond - uncond). The loop checks for all rows finished every sync_every steps
    (0: never; the only host syncs of the loop).
    """
    check_sampling(temperature, top_k, top_p)
    b, s = prompt.shape if isinstance(prompt, Tensor) and prompt.dim() == 2 else (0, 0)
    if prompt_lengths is None and isinstance(prompt, Tensor):
        prompt_lengths = torch.full((b,), s, dtype=torch.int64, device=prompt.device)
    _check(prompt, prompt_lengths, max_new_tokens, cache, cfg_scale)
    device = prompt.device
    stops = torch.tensor(list(stop_tokens), dtype=torch.int64, device=device)
    tokens = torch.full((b, max_new_tokens), pad_token, dtype=torch.int64, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.zeros(b, dtype=torch.int64, device=device)
    rows = torch.arange(b, device=device)

    final = prompt_lengths.long() - 1
    if _takes_last(model):
        last = model(prompt.long(), cache, last=final)[:, 0]  # (B, V) at each prompt's last token
    else:
        last = model(prompt.long(), cache)[rows, final]  # from (B, S, V): the prompt, padding included
    cache.advance(prompt_lengths.to(torch.int32))
    for step in range(max_new_tokens):
        if logits_processor is not None:
            last = logits_processor(step, tokens[:, :step], last)
        if cfg_scale is not None:
            cond, uncond = last.float().chunk(2)
            pick = sample(uncond + cfg_scale * (cond - uncond), temperature, top_k, top_p, generator)
            pick = torch.cat([pick, pick])
        else:
            pick = sample(last, temperature, top_k, top_p, generator)
        # Finished rows still step (static shapes) on the token drawn for them, a real id; the output
        # holds pad_token there.
        tokens[:, step] = torch.where(finished, pad_token, pick)
        lengths += (~finished).long()
        finished |= torch.isin(pick, stops)
        if step + 1 == max_new_tokens or (sync_every and (step + 1) % sync_every == 0 and bool(finished.all())):
            break
        last = model(pick[:, None], cache)[:, -1]
        cache.advance(1)
    return tokens, lengths
