"""Launch configs of the Triton attention kernels: tile sizes, warps and pipeline stages per pass.

They are chosen the way every vlfast kernel's are (vlfast/_launch_configs.py): in the interpreter
32 x 32 tiles on 1 warp; with VLFAST_AUTOTUNE=1 on a GPU every candidate of the pass is timed on the
first call of each key (pass, dtype, head dim, mask kind, dot precision, length bucket) and the
fastest kept for the process; otherwise the default of the dtype and head dim. The block maps
(blocks.py) depend on the tiles, so each config gets its own map; the backward's dQ and dK/dV
kernels share one config (the same block map, read by query and by key).

This module imports neither triton nor the kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._launch_configs import KernelConfigs, chosen
from ...masks import DALLE_KINDS

PASSES = ("fwd", "bwd")
# The kinds, in order of precedence for composed masks (see mask_kind).
KINDS = ("dalle_row", "dalle_column", "dalle_conv", "spans", "window", "causal", "padding", "none")
MAX_HEAD_DIM = 256


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

    def __str__(self) -> str:
        return f"{self.bm}x{self.bn} w{self.num_warps} s{self.num_stages}" + (" tma" if self.tma else "")


INTERPRETER_CONFIG = Config(32, 32, 1, 1)


# --- keys --------------------------------------------------------------------------------------------

def mask_kind(mask) -> str:
    """The kind of a vlfast.masks.Mask (or None) that keys its autotuning; one of KINDS.

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


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"vlfast attention: the Triton kernels take float16, bfloat16 or float32, got {dtype}")
    return dtype


def length_bucket(length: int) -> int:
    """A coarse sequence-length class for autotuning: the next power of two, within [128, 32768]."""
    bucket = 128
    while bucket < length and bucket < 32768:
        bucket *= 2
    return bucket


def launch_key(pass_: str, dtype: torch.dtype, head_dim: int, kind: str, precision: str, length: int) -> tuple:
    """The key a pass's config is chosen by; the candidates depend on its first three elements."""
    return (_check_pass(pass_), _check_dtype(dtype), head_dim, _check_kind(kind), precision, length_bucket(length))


# --- the built-in defaults -----------------------------------------------------------------------------
# Hopper-oriented, from ahead-of-time compiles for sm_90a (tests/tools/triton_aot.py): bf16 / fp16 tiles
# of 128 x 64 forward and 64 x 64 backward (64 x 64 and 64 x 32 at head dims over 128), except the
# backward at head dims 65-128: 128 x 64 on 2 stages, measured on an H100 (torch 2.11, triton 3.6,
# benchmarks/results/h100-2026-12-05-autotune.json, bf16 causal D 128): 1.35 ms against 64 x 64's
# 2.26 at batch 4 x 32 heads x 2048 tokens, 0.063 against 0.075 ms at 1 x 4 x 1024 (64 x 64 on 4 warps
# was 1.40 and 0.049, but spills 460 B in its dK/dV kernel). float32 (FMA units, or TF32 if PyTorch
# allows it) 64 x 32 and 32 x 32, small enough for registers. 3 stages up to head dim 128, else 2. The
# forward runs on 8 warps where BM >= 128 or the head dim >= 128. The backward always runs on 8 warps: its dK/dV kernel holds two (BN, D) float32
# accumulators, and on 4 warps it spilled at every head dim (bf16: 44 B at D 64, 456 B at D 96, vs 0
# and 100 B on 8; exact fp32: 948 B at D 64 and 16 KB at D 96, vs 0 and 936 B on 8). The same for
# every mask kind.
def default_config(head_dim: int, dtype: torch.dtype, pass_: str) -> Config:
    """The default of a pass: the first candidate."""
    _check_head_dim(head_dim)
    if _check_dtype(dtype) == torch.float32:
        fwd, bwd = (64, 32), (32, 32)
    elif head_dim <= 64:
        fwd, bwd = (128, 64), (64, 64)
    elif head_dim <= 128:
        fwd, bwd = (128, 64), (128, 64)
    else:
        fwd, bwd = (64, 64), (64, 32)
    stages = 3 if head_dim <= 128 else 2
    if _check_pass(pass_) == "fwd":
        return Config(*fwd, 8 if fwd[0] >= 128 or head_dim >= 128 else 4, stages)
    return Config(*bwd, 8, 2 if bwd[0] >= 128 else stages)


# --- candidates ------------------------------------------------------------------------------------------
# Per (dtype class, BLOCK_D family, pass); candidates() puts the head dim's default first. Checked by
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


def candidates(head_dim: int, dtype: torch.dtype, pass_: str) -> list:
    """The configs autotuning tries, the default first."""
    default = default_config(head_dim, dtype, pass_)
    cls = "fp32" if dtype == torch.float32 else "half"
    family = _CANDIDATES[(cls, _block_d_family(head_dim), pass_)]
    return [default] + [c for c in family if c != default]


def _check_head_dim(head_dim: int) -> int:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"vlfast attention: head dims 1 to {MAX_HEAD_DIM}, got {head_dim}")
    return head_dim


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"vlfast attention: mask kind must be one of {KINDS}, got {kind!r}")
    return kind


def _check_pass(pass_: str) -> str:
    if pass_ not in PASSES:
        raise ValueError(f"vlfast attention: pass must be one of {PASSES}, got {pass_!r}")
    return pass_


# Each pass's configs; a key is launch_key(...).
CONFIGS = {pass_: KernelConfigs(f"attention.{pass_}", lambda key: candidates(key[2], key[1], key[0]),
                                interpreter=INTERPRETER_CONFIG)
           for pass_ in PASSES}


def last_choices(forget: bool = False) -> dict:
    """The configs chosen so far per pass and key (for benchmark rows; vlfast/_launch_configs.chosen);
    forget=True also clears them, so that the next call's choices are all that is reported."""
    return chosen("attention.", forget)
