"""What every checkpoint loader shares: reading files safely, key maps applied with every error listed.

Checkpoints are read with safetensors or torch.load(weights_only=True) only; nothing in a file is ever
executed. A key map is {vlfast key: checkpoint key, a tuple of keys (concatenated along dim 0, e.g.
q, k, v -> qkv) or Transposed(key)}; convert() checks a checkpoint against it before copying anything.
"""
from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

Source = Union[str, Path, Mapping]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: every missing / unexpected key and shape mismatch."""

    def __init__(self, what: str, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [what]
        for title, items in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                             ("shape mismatches", self.mismatched)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {item}" for item in items[:50]]
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Transposed:
    """A checkpoint matrix stored (in, out), as OpenAI stores its projections; vlfast's Linear wants (out, in)."""
    key: str


def _source_keys(entry) -> tuple:
    if isinstance(entry, Transposed):
        return (entry.key,)
    return entry if isinstance(entry, tuple) else (entry,)


def _source_shape(entry, shape: tuple) -> tuple:
    """The shape each checkpoint tensor of `entry` must have for a vlfast tensor of `shape`."""
    if isinstance(entry, Transposed):
        return shape[::-1]
    if isinstance(entry, tuple):
        return (shape[0] // len(entry),) + shape[1:]
    return shape


def convert(state_dict: Mapping, mapping: dict, shapes: dict, what: str, ignored=()) -> dict:
    """A checkpoint's tensors -> vlfast's state dict by `mapping`, for a model whose parameters have
    `shapes` ({vlfast key: shape}). Keys in `ignored` (metadata beside the weights) may be present.

    Raises CheckpointError listing every missing key, unexpected key and shape mismatch.
    """
    _check_tensors(state_dict)
    used = {k for entry in mapping.values() for k in _source_keys(entry)}
    missing = sorted(k for k in used if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in used and k not in ignored)
    mismatched = []
    for ours, entry in mapping.items():
        for key in _source_keys(entry):
            want = _source_shape(entry, shapes[ours])
            if key in state_dict and tuple(state_dict[key].shape) != want:
                mismatched.append(f"{key}: checkpoint {tuple(state_dict[key].shape)}, model expects {want} "
                                  f"(for vlfast {ours})")
    if missing or unexpected or mismatched:
        raise CheckpointError(what, missing, unexpected, mismatched)
    out = {}
    for ours, entry in mapping.items():
        if isinstance(entry, Transposed):
            out[ours] = state_dict[entry.key].t()
        elif isinstance(entry, tuple):
            out[ours] = torch.cat([state_dict[k] for k in entry], dim=0)
        else:
            out[ours] = state_dict[entry]
    return out


def export(state: Mapping, mapping: dict) -> dict:
    """vlfast's tensors under the checkpoint's keys (the inverse of convert), as separate contiguous
    copies (safetensors refuses tensors that share memory)."""
    out = {}
    for ours, entry in mapping.items():
        tensor = state[ours].detach()
        if isinstance(entry, Transposed):
            out[entry.key] = tensor.t().contiguous()
        elif isinstance(entry, tuple):
            out.update({k: part.clone() for k, part in zip(entry, tensor.chunk(len(entry), dim=0))})
        else:
            out[entry] = tensor.clone()
    return out


# ---- reading files -----------------------------------------------------------------------------

_FOLDER_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _check_tensors(state_dict) -> None:
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"a checkpoint must be a mapping of names to tensors, got {type(state_dict).__name__}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError("a checkpoint must map names to tensors; these entries are not tensors: "
                              + ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))


def _why_unpickling_failed(e: Exception) -> str:
    """The line of torch's message that names the cause (e.g. the class it refused), without escape codes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line] or [type(e).__name__]
    cause = next((line for line in lines if "WeightsUnpickler error" in line), lines[0])
    return cause.split(". ")[0].rstrip(".")  # its first sentence; the rest is how to load it unsafely


def _load_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from e
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} cannot be loaded with torch.load(weights_only=True): {_why_unpickling_failed(e)}. vlfast reads "
            "safetensors "
            "files and weights-only PyTorch files and never unpickles other objects. OpenAI's original .pt "
            "files are TorchScript: if you trust the file, load it yourself (torch.jit.load(path).state_dict()) "
            "and pass the dict, or convert it to safetensors.") from e


def read_state_dict(source: Source) -> dict:
    """{name: tensor} from a dict, a .safetensors file, a weights-only PyTorch file, or a folder holding
    one of model.safetensors (or its sharded index), open_clip_model.safetensors, pytorch_model.bin,
    open_clip_pytorch_model.bin."""
    if isinstance(source, Mapping):
        _check_tensors(source)
        return dict(source)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be a path or a state dict, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out = {}
            for shard in shards:
                out.update(_load_file(path / shard))
            return out
        for name in _FOLDER_FILES:
            if (path / name).is_file():
                return read_state_dict(path / name)
        raise FileNotFoundError(f"{path} holds none of {', '.join(_FOLDER_FILES)} or model.safetensors.index.json")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = _load_file(path)
    _check_tensors(state)
    return state
