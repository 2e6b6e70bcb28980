"""The ops: each package holds reference.py (the spec and CPU path), triton.py, cuda.py, and the
public function with validation, dispatch and its torch.library boundary in __init__.py.

The public functions are exported from `vlfast` itself; not re-exported here, so that
vlfast.ops.<op> stays the package."""
