"""vlfast: fused Triton and CUDA kernels for vision-language models."""
from ._dispatch import IMPLS, ImplUnavailableError
from .ops.clip_loss import clip_loss
from .ops.codebook_lookup import codebook_lookup
from .ops.attention import attention, attention_varlen
from .ops.attention_decode import attention_decode
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.similarity_topk import similarity_topk
from . import masks, nn
from . import generation, retrieval
from . import models
from . import loaders

__version__ = "0.1.0"
__all__ = ["attention", "attention_varlen", "attention_decode", "masks", "generation", "retrieval", "models", "loaders", "clip_loss", "codebook_lookup", "linear_cross_entropy", "similarity_topk", "nn", "ImplUnavailableError", "IMPLS", "__version__"]
