"""What every checkpoint loader shares: reading files safely, key maps applied with every error listed.

Checkpoints are read with safetensors or torch.load(weights_only=True) only; nothing in a file is ever
executed. A key map is {vlfast key: checkpoint key, a tuple of keys (equal parts concatenated along
dim 0, e.g. q, k, v -> qkv), Concatenated(keys, rows) or Transposed(key)}; convert() checks a
checkpoint against it before copying anything.
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


@dataclass(frozen=True)
class Concatenated:
    """Checkpoint tensors concatenated along dim 0 into one vlfast tensor, with their row counts
    (transformers' q, k, v projections -> qkv, where grouped-query k and v are smaller than q)."""
    keys: tuple
    rows: tuple


def _parts(entry, shape: tuple) -> list:
    """[(checkpoint key, the shape it must have)] for a vlfast tensor of `shape` (a plain tuple of keys:
    equal parts)."""
    if isinstance(entry, Transposed):
        return [(entry.key, shape[::-1])]
    if isinstance(entry, tuple):
        entry = Concatenated(entry, (shape[0] // len(entry),) * len(entry))
    if isinstance(entry, Concatenated):
        return [(k, (rows,) + tuple(shape[1:])) for k, rows in zip(entry.keys, entry.rows)]
    return [(entry, shape)]


def convert(state_dict: Mapping, mapping: dict, shapes: dict, what: str, ignored=()) -> dict:
    """A checkpoint's tensors -> vlfast's state dict by `mapping`, for a model whose parameters have
    `shapes` ({vlfast key: shape}). Keys in `ignored` (metadata beside the weights) may be present.

    Raises CheckpointError listing every missing key, unexpected key and shape mismatch.
    """
    _check_tensors(state_dict)
    parts = {ours: _parts(entry, shapes[ours]) for ours, entry in mapping.items()}
    used = {key for entry in parts.values() for key, _ in entry}
    missing = sorted(k for k in used if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in used and k not in ignored)
    mismatched = [f"{key}: checkpoint {tuple(state_dict[key].shape)}, model expects {want} (for vlfast {ours})"
                  for ours, entry in parts.items() for key, want in entry
                  if key in state_dict and tuple(state_dict[key].shape) != want]
    if missing or unexpected or mismatched:
        raise CheckpointError(what, missing, unexpected, mismatched)
    out = {}
    for ours, entry in mapping.items():
        if isinstance(entry, Transposed):
            out[ours] = state_dict[entry.key].t()
        elif len(parts[ours]) > 1:
            out[ours] = torch.cat([state_dict[key] for key, _ in parts[ours]], dim=0)
        else:
            out[ours] = state_dict[parts[ours][0][0]]
    return out


def export(state: Mapping, mapping: dict) -> dict:
    """vlfast's tensors under the checkpoint's keys (the inverse of convert), as separate contiguous
    copies (safetensors refuses tensors that share memory)."""
    out = {}
    for ours, entry in mapping.items():
        tensor = state[ours].detach()
        if isinstance(entry, Transposed):
            out[entry.key] = tensor.t().contiguous()
            continue
        parts = _parts(entry, tuple(tensor.shape))
        pieces = tensor.split([shape[0] for _, shape in parts], dim=0) if len(parts) > 1 else [tensor]
        out.update({key: piece.clone() for (key, _), piece in zip(parts, pieces)})
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


def config_json_beside(source: Source):
    """The config.json of a save_pretrained folder (or beside a file) as a dict; None for a state dict
    or where there is none."""
    if isinstance(source, Mapping):
        return None
    path = Path(source)
    config_json = (path if path.is_dir() else path.parent) / "config.json"
    return json.loads(config_json.read_text()) if config_json.is_file() else None


def model_config(source: Source, config, config_type: type, from_transformers, what: str):
    """config as a vlfast `config_type`: given as one, as transformers' config (object or dict) read by
    from_transformers, or, when None, from the config.json beside the weights. `what` names the
    transformers class in the error for a bare state dict (the number of heads is not in the weights)."""
    if config is None:
        config = config_json_beside(source)
        if config is None:
            raise ValueError(f"config is required: pass the transformers {what} (or config.json's contents) that "
                             "the weights belong to; the number of heads is not in the weights")
    return config if isinstance(config, config_type) else from_transformers(config)
