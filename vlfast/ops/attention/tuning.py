"""Launch configs of the Triton attention kernels: tile sizes, warps and pipeline stages per pass.

A config is chosen per (dtype class, head-dim bucket, mask kind, pass), in this order:
  1. the Triton interpreter: always 32 x 32 tiles, 1 warp, 1 stage (small and quick on a CPU);
  2. VLFAST_AUTOTUNE=1 on a GPU: every candidate is timed (triton.testing.do_bench) on the first call
     of each key, which here also names the exact dtype, the dot precision and a coarse length
     bucket; the winner is kept for the rest of the process (timing synchronises the GPU: make the
     first calls before capturing CUDA graphs);
  3. the tuned table of this GPU (tuned/*.json, matched by GPU name and compute capability), where
     it has an entry for the key; benchmarks/tune_attention.py writes these files on a GPU;
  4. the built-in defaults (DEFAULTS): Hopper-oriented choices, the same for every mask kind.
The block maps (blocks.py) depend on the tiles, so each config gets its own map; the backward's dQ
and dK/dV kernels share one config (the same block map, read by query and by key).

This module imports neither triton nor the kernels, so `python -m vlfast info` can describe the
tables where triton is not installed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..._backends import triton_interpreting
from ...masks import DALLE_KINDS

_INTERPRET = triton_interpreting()
_AUTOTUNE = os.environ.get("VLFAST_AUTOTUNE", "0") == "1"
TABLE_DIR = Path(__file__).resolve().parent / "tuned"
TABLE_FORMAT = 1

PASSES = ("fwd", "bwd")
DTYPE_CLASSES = ("half", "fp32")  # half: bfloat16 and float16 (tensor cores); fp32: FMA units or TF32
# The kinds, in order of precedence for composed masks (see mask_kind).
KINDS = ("dalle_row", "dalle_column", "dalle_conv", "spans", "window", "causal", "padding", "none")
# Head-dim buckets: (largest head dim, name). Every head dim the tuning script measures ends a bucket,
# and no default changes inside a bucket (the defaults change at 128, so 128 is a bucket of its own).
HEAD_DIM_BUCKETS = ((32, "d1-32"), (64, "d33-64"), (72, "d65-72"), (80, "d73-80"), (96, "d81-96"),
                    (104, "d97-104"), (127, "d105-127"), (128, "d128"), (256, "d129-256"))
BUCKET_NAMES = tuple(name for _, name in HEAD_DIM_BUCKETS)
_ENTRY_EXTRAS = ("ms", "default_ms", "candidates_ms")  # informational fields a table entry may carry
MEASURED_FIELDS = ("device", "torch", "triton", "date")  # the run behind a table's entries (null: none yet)


@dataclass(frozen=True)
class Config:
    """One launch of a pass: (BM, BN) tiles (the block map is built for them), warps, stages, and
    whether the tiles each loop loads (K, V; for dK/dV: Q, dO) arrive by TMA (Hopper's tensor memory
    accelerator, through host-side tensor descriptors) instead of per-thread loads, where the call
    allows it (triton.py's _tma_ok)."""
    bm: int
    bn: int
    num_warps: int
    num_stages: int
    tma: bool = False

    def launch(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def to_json(self) -> dict:
        out = {"bm": self.bm, "bn": self.bn, "num_warps": self.num_warps, "num_stages": self.num_stages}
        return {**out, "tma": True} if self.tma else out

    def __str__(self) -> str:
        return f"{self.bm}x{self.bn} w{self.num_warps} s{self.num_stages}" + (" tma" if self.tma else "")


INTERPRETER_CONFIG = Config(32, 32, 1, 1)


# --- keys --------------------------------------------------------------------------------------------

def mask_kind(mask) -> str:
    """The kind of a vlfast.masks.Mask (or None) that names its tuning entries; one of KINDS.

    A composed mask takes the first kind in this order that applies: dalle_row / dalle_column /
    dalle_conv (a DALL-E part), spans (bidirectional spans or an image prefix, causal elsewhere),
    window (sliding window), causal, padding (key padding and nothing else), none. The kind is the
    part that decides which tiles are visited; key padding only trims keys, so causal + key padding
    (CLIP's text tower) is "causal" and spans + key padding is "spans"."""
    if mask is None:
        return "none"
    if mask.dalle is not None:
        code = mask.dalle[3]
        names = {v: k for k, v in DALLE_KINDS.items()}
        if code not in names:
            raise ValueError(f"vlfast attention tuning: unknown DALL-E kind code {code!r} in {mask!r}")
        return f"dalle_{names[code]}"
    if mask.span_ids is not None:
        return "spans"
    if mask.window is not None:
        return "window"
    if mask.causal:
        return "causal"
    if mask.key_valid is not None:
        return "padding"
    return "none"


def head_dim_bucket(head_dim: int) -> str:
    for largest, name in HEAD_DIM_BUCKETS:
        if head_dim <= largest:
            return name
    raise ValueError(f"vlfast attention tuning: head dims up to {HEAD_DIM_BUCKETS[-1][0]}, got {head_dim}")


def dtype_class(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    if dtype == torch.float32:
        return "fp32"
    raise ValueError(f"vlfast attention tuning: the Triton kernels take float16, bfloat16 or float32, got {dtype}")


def length_bucket(length: int) -> int:
    """A coarse sequence-length class for autotuning: the next power of two, within [128, 32768]."""
    bucket = 128
    while bucket < length and bucket < 32768:
        bucket *= 2
    return bucket


def table_key(cls: str, bucket: str, kind: str, pass_: str) -> str:
    """The key of a table entry in the JSON files, e.g. "half/d128/causal/fwd"."""
    return f"{cls}/{bucket}/{kind}/{pass_}"


# --- the built-in defaults -----------------------------------------------------------------------------
# Hopper-oriented, from ahead-of-time compiles for sm_90a (tests/tools/triton_aot.py), not yet measured:
# bf16 / fp16 tiles of 128 x 64 forward and 64 x 64 backward (64 x 64 and 64 x 32 at head dims over
# 128); float32 (FMA units, or TF32 if PyTorch allows it) 64 x 32 and 32 x 32, small enough for
# registers. 3 stages up to head dim 128, else 2. The forward runs on 8 warps where BM >= 128 or the
# head dim >= 128. The backward always runs on 8 warps: its dK/dV kernel holds two (BN, D) float32
# accumulators, and on 4 warps it spilled at every head dim (bf16: 44 B at D 64, 456 B at D 96, vs 0
# and 100 B on 8; exact fp32: 948 B at D 64 and 16 KB at D 96, vs 0 and 936 B on 8).
def _defaults_for(cls: str, largest: int) -> dict:
    if cls == "fp32":
        fwd, bwd = (64, 32), (32, 32)
    elif largest <= 128:
        fwd, bwd = (128, 64), (64, 64)
    else:
        fwd, bwd = (64, 64), (64, 32)
    stages = 3 if largest <= 128 else 2
    return {"fwd": Config(*fwd, 8 if fwd[0] >= 128 or largest >= 128 else 4, stages),
            "bwd": Config(*bwd, 8, stages)}


DEFAULTS = {(cls, name, kind, p): config
            for cls in DTYPE_CLASSES for largest, name in HEAD_DIM_BUCKETS
            for p, config in _defaults_for(cls, largest).items() for kind in KINDS}


# --- candidates ------------------------------------------------------------------------------------------
# Per (dtype class, BLOCK_D family, pass); candidates() puts the bucket's default first. Checked by
# ahead-of-time compiles for sm_90a (`python -m tests.tools.triton_aot --op attention --all-configs`;
# bf16, and float32 both as TF32 and exact): every candidate fits the H200's 227 KB of shared memory
# and none spills more than 1 KB of registers, except the exact fp32 dK/dV default at D > 128 (~16 KB;
# every tile tried there spills). Dropped for spilling over 1 KB or for
# shared memory: fp32 dK/dV tiles 32 x 64 and 64 x 32 (3-35 KB spilled, exact), 32 x 32 on 4 warps at
# D = 128 (16 KB); fp32 64 x 64 forward at D > 64 (1 KB spilled exact; 448 KB of shared memory at
# D = 256); bf16 64 x 128 forward at D = 256 (304 KB of shared memory). Half-precision tiles keep
# BM >= 64 (wgmma's smallest M): with 32 rows the dQ kernel compiles to no tensor-core instructions.
# Half-precision passes also have TMA candidates (Config.tma; dense layouts on Hopper, see triton.py).
_C = Config
_CANDIDATES = {
    ("half", 64, "fwd"): [_C(128, 64, 8, 3), _C(128, 128, 8, 2), _C(64, 64, 4, 3), _C(128, 32, 8, 3),
                          _C(128, 64, 8, 4), _C(128, 64, 8, 3, True), _C(128, 128, 8, 2, True)],
    ("half", 64, "bwd"): [_C(64, 64, 4, 3), _C(64, 64, 8, 3), _C(128, 64, 8, 3), _C(64, 32, 4, 3),
                          _C(64, 64, 8, 3, True)],
    ("half", 128, "fwd"): [_C(128, 64, 8, 3), _C(128, 128, 8, 2), _C(64, 64, 4, 3), _C(128, 32, 8, 3),
                           _C(128, 64, 8, 2), _C(128, 64, 8, 3, True), _C(128, 64, 8, 2, True)],
    ("half", 128, "bwd"): [_C(64, 64, 4, 3), _C(64, 64, 8, 3), _C(64, 32, 8, 3), _C(128, 32, 8, 3),
                           _C(128, 64, 8, 2), _C(64, 64, 8, 3, True)],
    ("half", 256, "fwd"): [_C(64, 64, 8, 2), _C(64, 32, 8, 2), _C(128, 32, 8, 2), _C(128, 64, 8, 2),
                           _C(64, 64, 8, 2, True)],
    ("half", 256, "bwd"): [_C(64, 32, 8, 2), _C(64, 64, 8, 1), _C(128, 32, 8, 2), _C(64, 64, 8, 2),
                           _C(64, 32, 8, 2, True)],
    ("fp32", 64, "fwd"): [_C(64, 32, 4, 3), _C(64, 32, 8, 3), _C(32, 32, 4, 3), _C(64, 64, 4, 3)],
    ("fp32", 64, "bwd"): [_C(32, 32, 4, 3), _C(32, 32, 8, 2), _C(32, 32, 8, 3)],
    ("fp32", 128, "fwd"): [_C(64, 32, 4, 3), _C(64, 32, 8, 3), _C(32, 32, 4, 3), _C(64, 32, 8, 2)],
    ("fp32", 128, "bwd"): [_C(32, 32, 8, 3), _C(32, 32, 8, 2)],
    ("fp32", 256, "fwd"): [_C(64, 32, 8, 2), _C(32, 32, 4, 3), _C(32, 32, 8, 2)],
    # exact fp32 dK/dV at D > 128 spills 15 KB or more with every tile tried; only the default is left
    ("fp32", 256, "bwd"): [_C(32, 32, 8, 2)],
}


def _block_d_family(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def default_config(head_dim: int, dtype: torch.dtype, kind: str, pass_: str) -> Config:
    """The built-in default (no interpreter, table or autotuning involved)."""
    return DEFAULTS[(dtype_class(dtype), head_dim_bucket(head_dim), _check_kind(kind), _check_pass(pass_))]


def candidates(head_dim: int, dtype: torch.dtype, pass_: str) -> list:
    """The configs autotuning and benchmarks/tune_attention.py try, the default first."""
    cls = dtype_class(dtype)
    default = DEFAULTS[(cls, head_dim_bucket(head_dim), "none", _check_pass(pass_))]
    family = _CANDIDATES[(cls, _block_d_family(head_dim), pass_)]
    return [default] + [c for c in family if c != default]


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"vlfast attention tuning: mask kind must be one of {KINDS}, got {kind!r}")
    return kind


def _check_pass(pass_: str) -> str:
    if pass_ not in PASSES:
        raise ValueError(f"vlfast attention tuning: pass must be one of {PASSES}, got {pass_!r}")
    return pass_


# --- tuned tables ------------------------------------------------------------------------------------------

@dataclass
class Table:
    """One tuned-table file: the GPU it was measured on and its entries (table_key -> Config)."""
    path: Path
    gpu: str
    capability: str
    measured: dict  # MEASURED_FIELDS and any other facts of the run; all null in an empty table
    configs: dict
    raw: dict  # the file's JSON, extras included (the tuning script merges into it)


class TableError(ValueError):
    """A tuned-table file that does not follow the format; the message names the file, key and field."""


def _fail(path, where: str, message: str):
    raise TableError(f"vlfast attention tuning table {path}: {where}: {message}")


def _power_of_two(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


def _parse_entry(path, key: str, value) -> Config:
    where = f"configs[{key!r}]"
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) != 4:
        _fail(path, where, "keys are 'dtype class/head-dim bucket/mask kind/pass', e.g. 'half/d128/causal/fwd'")
    for part, allowed, what in zip(parts, (DTYPE_CLASSES, BUCKET_NAMES, KINDS, PASSES),
                                   ("dtype class", "head-dim bucket", "mask kind", "pass")):
        if part not in allowed:
            _fail(path, where, f"unknown {what} {part!r}; one of {', '.join(allowed)}")
    if not isinstance(value, dict):
        _fail(path, where, f"must be an object with bm, bn, num_warps, num_stages, got {type(value).__name__}")
    unknown = sorted(set(value) - {"bm", "bn", "num_warps", "num_stages", "tma", *_ENTRY_EXTRAS})
    if unknown:
        _fail(path, where, f"unknown field {unknown[0]!r}")
    rules = {"bm": (lambda x: _power_of_two(x) and 16 <= x <= 256, "a power of two in 16..256"),
             "bn": (lambda x: _power_of_two(x) and 16 <= x <= 256, "a power of two in 16..256"),
             "num_warps": (lambda x: _power_of_two(x) and x <= 16, "1, 2, 4, 8 or 16"),
             "num_stages": (lambda x: isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 8, "an int in 1..8")}
    for field, (ok, want) in rules.items():
        if field not in value:
            _fail(path, where, f"missing field {field!r}")
        if not ok(value[field]):
            _fail(path, where, f"field {field!r} must be {want}, got {value[field]!r}")
    tma = value.get("tma", False)
    if not isinstance(tma, bool):
        _fail(path, where, f"field 'tma' must be true or false, got {tma!r}")
    return Config(value["bm"], value["bn"], value["num_warps"], value["num_stages"], tma)


def load_table(path) -> Table:
    """Read and check one tuned-table file (the format README: tuned/ beside this module)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TableError(f"vlfast attention tuning table {path}: cannot read it as JSON: {e}") from e
    if not isinstance(raw, dict):
        _fail(path, "top level", "must be a JSON object")
    if raw.get("format") != TABLE_FORMAT:
        _fail(path, "field 'format'", f"must be {TABLE_FORMAT}, got {raw.get('format')!r}")
    for field in ("gpu", "capability"):
        if not isinstance(raw.get(field), str) or not raw[field]:
            _fail(path, f"field {field!r}", f"must be a non-empty string, got {raw.get(field)!r}")
    measured = raw.get("measured")
    if not isinstance(measured, dict):
        _fail(path, "field 'measured'", f"must be an object with {', '.join(MEASURED_FIELDS)}, "
                                        f"got {type(measured).__name__}")
    for field in MEASURED_FIELDS:
        if field not in measured or not (measured[field] is None or isinstance(measured[field], str)):
            _fail(path, f"field 'measured'.{field}", f"must be a string or null, got {measured.get(field)!r}")
    configs = raw.get("configs")
    if not isinstance(configs, dict):
        _fail(path, "field 'configs'", f"must be an object, got {type(configs).__name__}")
    if configs:
        missing = [f for f in MEASURED_FIELDS if not measured[f]]
        if missing:
            _fail(path, f"field 'measured'.{missing[0]}", "a table with entries must name the run that measured them")
    return Table(path, raw["gpu"], raw["capability"], measured,
                 {key: _parse_entry(path, key, value) for key, value in configs.items()}, raw)


def empty_table(gpu: str, capability: str) -> dict:
    """The JSON of a table with no entries yet."""
    return {"format": TABLE_FORMAT,
            "about": "Launch configs of vlfast's Triton attention kernels on one GPU (vlfast/ops/attention/"
                     "tuning.py), written by benchmarks/tune_attention.py. Keys: dtype class/head-dim "
                     "bucket/mask kind/pass. Entries override the built-in defaults; a key without one "
                     "keeps the default.",
            "gpu": gpu, "capability": capability, "measured": {f: None for f in MEASURED_FIELDS}, "configs": {}}


_TABLES: dict = {}


def _gpu(device) -> Optional[tuple]:
    """(GPU name, "major.minor") of a CUDA device (the current one for None), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index if device is not None else None
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def table_for(gpu: str, capability: str) -> Optional[Table]:
    """The tuned table whose GPU name and capability match, or None. Cached; a malformed file raises."""
    key = (gpu, capability, str(TABLE_DIR))
    if key not in _TABLES:
        found = None
        for path in sorted(TABLE_DIR.glob("*.json")):
            table = load_table(path)
            if table.gpu == gpu and table.capability == capability:
                found = table
                break
        _TABLES[key] = found
    return _TABLES[key]


# --- choosing ------------------------------------------------------------------------------------------

_AUTOTUNED: dict = {}  # autotuning key -> (winner, {str(config): ms or the error})
_LAST: dict = {}  # pass -> {"config": ..., "source": ...} of the latest choice (benchmark rows record it)


def choose(head_dim: int, dtype: torch.dtype, kind: str, pass_: str, *, device=None, length: int = 0,
           precision: str = "", run: Optional[Callable[[Config], object]] = None) -> Config:
    """The config of one pass (the order is in the module docstring). run(config) launches the pass
    with a config; it is timed for each candidate when autotuning, and unused otherwise."""
    if _INTERPRET:
        return _chose(pass_, INTERPRETER_CONFIG, "interpreter")
    cls, bucket = dtype_class(dtype), head_dim_bucket(head_dim)
    key = (cls, bucket, _check_kind(kind), _check_pass(pass_))
    gpu = _gpu(device)
    table = table_for(*gpu) if gpu is not None else None
    base = table.configs.get(table_key(*key)) if table is not None else None
    source = f"table {table.path.name} {table_key(*key)}" if base is not None else f"default {table_key(*key)}"
    base = base or DEFAULTS[key]
    if not _AUTOTUNE or run is None:
        return _chose(pass_, base, source)
    tune_key = key + (str(dtype).replace("torch.", ""), precision, length_bucket(length))
    if tune_key not in _AUTOTUNED:
        tried = [base] + [c for c in candidates(head_dim, dtype, pass_) if c != base]
        _AUTOTUNED[tune_key] = _autotune(tried, run, tune_key)
    return _chose(pass_, _AUTOTUNED[tune_key][0], f"autotuned {tune_key}")


def _chose(pass_: str, config: Config, source: str) -> Config:
    _LAST[pass_] = {"config": str(config), "source": source}
    return config


def last_choices(forget: bool = False) -> dict:
    """{pass: {"config", "source"}} of the latest choice per pass in this process (for benchmark rows);
    forget=True also clears them, so that the next call's choices are all that is reported."""
    out = {p: dict(v) for p, v in _LAST.items()}
    if forget:
        _LAST.clear()
    return out


def _time(run: Callable[[], object]) -> float:
    """Median milliseconds of run() on the GPU."""
    from triton.testing import do_bench
    return float(do_bench(run, warmup=10, rep=40, return_mode="median"))


def _autotune(tried: list, run: Callable[[Config], object], tune_key) -> tuple:
    """(fastest config, {config: ms or why it failed}); a candidate that fails to launch (out of shared
    memory, say) is skipped. The first of `tried` wins ties."""
    results, best = {}, None
    for config in tried:
        try:
            ms = _time(lambda: run(config))
        except Exception as e:  # a config this GPU cannot launch (out of resources) is a result
            lines = str(e).strip().splitlines()
            results[str(config)] = f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
            continue
        results[str(config)] = ms
        if best is None or ms < best[1]:
            best = (config, ms)
    if best is None:
        raise RuntimeError(f"vlfast attention autotuning {tune_key}: no candidate ran: {results}")
    return best[0], results


def autotuned() -> dict:
    """What autotuning chose in this process: {key: (winner, {config: ms or error})}."""
    return dict(_AUTOTUNED)


# --- for `python -m vlfast info` ----------------------------------------------------------------------------

def shipped_tables() -> list:
    """Every tuned-table file in TABLE_DIR, checked (a malformed one raises TableError)."""
    return [load_table(path) for path in sorted(TABLE_DIR.glob("*.json"))]


def _table_line(table: Table) -> str:
    size = f"{len(table.configs)} entries, measured {table.measured['date']}" if table.configs else "empty"
    return f"{table.path.name} ({table.gpu}, sm_{table.capability.replace('.', '')}: {size})"


def describe(device=None) -> dict:
    """Where attention's launch configs come from on this machine; "summary" is one line for people."""
    out = {"autotune": _AUTOTUNE, "interpreter": _INTERPRET, "gpu": None, "capability": None, "table": None,
           "entries": 0, "measured": None, "error": None}
    autotune = "; VLFAST_AUTOTUNE=1: candidates timed on the first call of each key" if _AUTOTUNE else ""
    try:
        found = _gpu(device)
        if found is not None:
            out["gpu"], out["capability"] = found
            table = table_for(*found)
        tables = shipped_tables()
    except TableError as e:
        out["error"] = str(e)
        out["summary"] = f"a tuned table is malformed (the Triton kernels will raise): {e}"
        return out
    if _INTERPRET:
        out["summary"] = f"the Triton interpreter: {INTERPRETER_CONFIG} for every pass"
    elif found is None:
        out["summary"] = ("no CUDA device; tuned tables shipped: "
                          + (", ".join(_table_line(t) for t in tables) or "none") + autotune)
    elif table is None:
        out["summary"] = (f"built-in defaults: no tuned table for {found[0]} (sm_{found[1].replace('.', '')}); "
                          "benchmarks/tune_attention.py writes one") + autotune
    else:
        out.update(table=str(table.path), entries=len(table.configs), measured=table.measured)
        where = "built-in defaults elsewhere" if table.configs else "built-in defaults until a GPU run fills it"
        out["summary"] = f"tuned table {_table_line(table)}; {where}" + autotune
    return out
