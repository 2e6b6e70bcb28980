"""vlfast: fused Triton and CUDA kernels for vision-language models."""
from ._dispatch import IMPLS, ImplUnavailableError
from .ops import clip_loss

__version__ = "0.1.0"
__all__ = ["clip_loss", "ImplUnavailableError", "IMPLS", "__version__"]
