"""Generation with a KV cache: the cache, the sampling rules and the loop (vlfast.attention_decode underneath)."""
from .kv_cache import KVCache
from .loop import generate, last_positions
from .sampling import filter_logits, sample

__all__ = ["KVCache", "generate", "last_positions", "sample", "filter_logits"]
