"""vlfast: fused Triton and CUDA kernels for vision-language models."""
from ._dispatch import IMPLS, ImplUnavailableError
from .ops.clip_loss import clip_loss
from . import nn

__version__ = "0.1.0"
__all__ = ["clip_loss", "nn", "ImplUnavailableError", "IMPLS", "__version__"]
