"""What every op's benchmark shares: the case and contender records, timing, peak memory, error.

An op's bench_<op>.py builds Cases and Contenders; the runner measures them with these functions.
"""
from __future__ import annotations

import os

import functools
import gc
import importlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

FWD_BWD = "fwd+bwd"
FWD = "fwd"

# A call this long (ms) is timed by a few plain runs instead of triton's do_bench, whose estimate
# alone costs five calls: an 8-second peer would eat a minute of the GPU script's budget.
DO_BENCH_BELOW_MS = 50.0
# Time spent timing one contender beyond its first measured call (ms).
TIMING_BUDGET_MS = 1000.0
MAX_REPS = 9
# On a CPU the contenders of one case and mode are timed in turns (measure_interleaved): a shared
# machine's load drifts over seconds and moved whole rows by up to 2x when each was timed alone. Short
# calls get more rounds, as their medians are the noisiest.
MIN_ROUNDS, MAX_ROUNDS = 3, 41
TURNS_BUDGET_MS = 500.0  # per contender: the quick CPU run stays under 2 minutes


@dataclass
class Case:
    """One input configuration of an op, e.g. softmax loss on 16384 x 768 bf16 features."""
    name: str
    shape: tuple
    dtype: torch.dtype
    modes: tuple = (FWD_BWD,)
    params: dict = field(default_factory=dict)


@dataclass
class Contender:
    """An implementation under test: vlfast's own or a peer.

    run(inputs, mode) returns named outputs ({"loss": ..., "d_image": ...}); skip says why it does
    not run in this case (not installed, no GPU, too slow here) and then run is None.
    """
    name: str
    run: Optional[Callable[[Any, str], dict]] = None
    skip: Optional[str] = None
    modes: Optional[tuple] = None  # None: every mode of the case
    describe: Optional[Callable[[], dict]] = None  # e.g. the kernel configs chosen, for the row
    # A bar, not a peer: it solves an easier problem (SDPA on a contiguous copy of a paged cache), shown
    # for scale; the ratio table names it beside the peers but never compares against it.
    bar: bool = False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Return cached blocks between contenders, so one's cache cannot push the next out of memory.

    On a CPU only the young generations are collected, where a contender's cyclic garbage lands: a full
    collection walks every object that torch, inductor and transformers hold, 0.2 s a call once they are
    imported (5 of the 13 s the quick LLaVA rows took)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    else:
        gc.collect(1)


def cpu_peak_bytes(fn: Callable[[], Any]) -> Optional[int]:
    """Extra bytes at peak above what was allocated before a call of `fn` on a CPU, from the profiler's
    record of every allocation and free (torch keeps no CPU peak counter); None if none was recorded.
    A separate, untimed call: the profiler slows what it watches."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    if not events:
        return None
    now = peak = 0
    for _, nbytes in events:  # + an allocation, - a free
        now += nbytes
        peak = max(peak, now)
    return peak


def _timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Optional[int]]:
    """(ms, extra bytes at peak above what was allocated before the call; None on a CPU)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return ms, peak


def measure(fn: Callable[[], Any], device: torch.device) -> tuple[float, Optional[int]]:
    """Median milliseconds of a warmed-up `fn`, and its peak extra memory in bytes (None on a CPU).

    CUDA: triton.testing.do_bench's median for short calls, else the median of a few synchronised
    runs. CPU: the median of a few perf_counter runs; the peak from one more, profiled call.
    """
    first, peak = _timed_call(fn, device)
    if device.type == "cuda" and first < DO_BENCH_BELOW_MS:
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median")), peak
    reps = max(0, min(MAX_REPS - 1, int(TIMING_BUDGET_MS // max(first, 1e-3))))
    times = [first] + [_timed_call(fn, device)[0] for _ in range(reps)]
    if device.type == "cpu":
        peak = cpu_peak_bytes(fn)
    return statistics.median(times), peak


def measure_interleaved(fns: dict) -> dict:
    """{name: median ms} of warmed-up CPU calls, timed in rounds that call every fn once, each round
    in a rotated order (two fns simply alternate); rounds as TURNS_BUDGET_MS per fn allows, within
    [MIN_ROUNDS, MAX_ROUNDS]. No fn is called twice in a row, so each call finds the caches as another
    fn left them: rotating two fns called each twice in a row every other round, once cold and once warm
    from its own call, and their medians fell on either side of that split from run to run (a DALL-E
    decode step 0.26 or 0.38 ms, its peer 0.38 or 0.28)."""
    names = list(fns)
    times = {n: [_timed_call(fns[n], torch.device("cpu"))[0]] for n in names}
    per_round = sum(t[0] for t in times.values())
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TURNS_BUDGET_MS * len(names) // max(per_round, 1e-3))))
    for r in range(1, rounds):
        shift = r % len(names) if len(names) > 2 else 0
        for n in names[shift:] + names[:shift]:
            times[n].append(_timed_call(fns[n], torch.device("cpu"))[0])
    return {n: statistics.median(t) for n, t in times.items()}


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|, in float64; the absolute error where ref is all zeros."""
    x = x.detach().to(device=ref.device, dtype=torch.float64)
    ref = ref.detach().to(torch.float64)
    diff = (x - ref).abs().max().item()
    size = ref.abs().max().item()
    return diff / size if size > 0 else diff


def compare(outputs: dict, reference: dict) -> dict:
    """{output name: rel_error} for every output that the reference also has."""
    return {k: rel_error(v, reference[k]) for k, v in outputs.items() if k in reference}


def worst(errors: dict) -> Optional[float]:
    """The largest error, NaN if any is NaN (a NaN output is the worst result there is)."""
    if not errors:
        return None
    values = list(errors.values())
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def loss_and_grads(loss_fn: Callable[[Any], torch.Tensor], leaves_of: Callable[[Any], list],
                   grad_names: tuple) -> Callable[[Any, str], dict]:
    """run(inputs, mode) for a Contender: the loss, and for fwd+bwd the gradient of every leaf
    (leaves_of(inputs)), as named outputs."""
    def run(x, mode: str) -> dict:
        if mode == FWD:
            with torch.no_grad():
                return {"loss": loss_fn(x)}
        loss = loss_fn(x)
        grads = torch.autograd.grad(loss, leaves_of(x))
        return {"loss": loss.detach(), **dict(zip(grad_names, grads))}
    return run


@functools.lru_cache(maxsize=None)
def import_peer(module: str, attr: str):
    """(the peer's function, None) or (None, why it does not import)."""
    try:
        return getattr(importlib.import_module(module), attr), None
    except Exception as e:  # ImportError, or a peer broken against this torch/triton
        return None, f"not importable: {type(e).__name__}: {e}"


def settings(**ran_with) -> Callable[[], dict]:
    """A peer's Contender.describe: the settings it ran with, recorded in each of its rows."""
    return lambda: dict(ran_with)


COMPILED = "torch.compile(dynamic=False), inductor defaults"


def compiled(fn: Callable, backend: str = "inductor") -> Callable:
    """torch.compile(fn) as a user would run it: one graph per shape, dtype and grad mode.

    A bench compiles one function for many cases: past dynamo's recompile limit it would quietly run
    eagerly under the compiled name, so the limit is raised and hitting it raises instead.
    """
    graph = torch.compile(fn, dynamic=False, backend=backend)
    limits = {k: v for k, v in (("recompile_limit", 64), ("fail_on_recompile_limit_hit", True))
              if hasattr(torch._dynamo.config, k)}

    def run(*args):
        with torch._dynamo.config.patch(**limits):
            return graph(*args)
    return run


INTERPRETER = "Triton on a CPU is its interpreter: tested, not benchmarked"


def vlfast_contenders(status: dict, device: torch.device, make_run: Callable[[str], Callable],
                      reference_skip: Optional[str] = None, describe: Optional[dict] = None) -> list:
    """A Contender per vlfast implementation (status: impl -> None or why it cannot run here):
    make_run(impl) for those that run, a skip row with the reason for the others. reference_skip
    says why this case does not time the reference path (None: it does)."""
    out = []
    for impl, why in status.items():
        if why is None and impl == "triton" and device.type != "cuda":
            why = INTERPRETER
        elif why is None and impl == "reference":
            why = reference_skip
            if why is None and device.type != "cuda" and status.get("torch", "absent") is None \
                    and os.environ.get("VLFAST_BENCH_REFERENCE", "0") != "1":
                why = "the readable spec; impl='torch' is the CPU path (VLFAST_BENCH_REFERENCE=1 times it)"
        name = f"vlfast-{impl}"
        out.append(Contender(name, skip=why) if why is not None
                   else Contender(name, make_run(impl), describe=(describe or {}).get(impl)))
    return out
