"""What the models' config dataclasses share: their int fields are positive."""
from __future__ import annotations

from dataclasses import fields


def check_positive(owner: str, obj) -> None:
    """Every int field of the dataclass `obj` is >= 1 (f.type is the annotation's text here: Optional[int]
    fields are the caller's to check)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{owner}.{f.name} must be a positive int, got {value!r}")
