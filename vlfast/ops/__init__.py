"""The ops: each package holds reference.py (the spec and CPU path), triton.py, cuda.py, and the
public function with validation, dispatch and its torch.library boundary in __init__.py."""
from .clip_loss import clip_loss

__all__ = ["clip_loss"]
