"""How every Triton kernel of vlfast picks its launch config (tile sizes, warps, pipeline stages).

Each kernel declares a KernelConfigs: for a key (a tuple its launcher builds from the call: dtype,
feature dimension, flags ...) an ordered list of candidate configs, the first the default, and
optionally one config for the interpreter. A launcher asks `choose(key, run)`:

  - under the Triton interpreter (TRITON_INTERPRET=1): the interpreter config (small tiles, quick on
    a CPU), or the default; never timed (triton 3.6's interpreter has no driver to time with);
  - with VLFAST_AUTOTUNE=1, a run(config) to time and more than one candidate: each candidate is
    timed on the GPU (triton.testing.do_bench, median) on the first call of each key and the fastest
    is kept for the process. A candidate that fails to launch (out of shared memory) is skipped.
    Timing runs the kernel many times and synchronises the GPU: run(config) must be safe to repeat
    (no accumulation into its outputs), and the first calls belong before CUDA-graph capture;
  - otherwise the default.

No per-GPU table of tuned configs: none was ever measured. A default changes in the code when a
VLFAST_AUTOTUNE=1 bench run on the GPU shows a candidate winning (bench rows record `chosen()`).
The config objects are the kernels' own (triton.Config, attention's tuning.Config): this module only
needs str() and ==, and imports no triton until it times something.
"""
from __future__ import annotations

from typing import Callable, Hashable, Optional, Sequence

from . import _env
from ._backends import triton_interpreting

ENV_VAR = "VLFAST_AUTOTUNE"


def autotune_requested() -> bool:
    """VLFAST_AUTOTUNE: "1" times candidates, "0" or unset takes defaults; anything else raises."""
    return _env.flag(ENV_VAR)


def _time_ms(run: Callable[[], object]) -> float:
    """Median milliseconds of run() on the GPU."""
    from triton.testing import do_bench
    return float(do_bench(run, warmup=10, rep=40, return_mode="median"))


# kernel name -> {key: {"config": str, "source": "interpreter" | "default" | "autotuned", "ms": {...}}}
_CHOSEN: dict = {}


class KernelConfigs:
    """The launch configs of one kernel (or of kernels launched together, like a backward's two)."""

    def __init__(self, kernel: str, candidates: Callable[[tuple], Sequence], interpreter=None):
        """kernel: a name for records ("clip_loss.stats"); candidates(key): the ordered configs of a
        key, the first the default; interpreter: the config under TRITON_INTERPRET=1 (default: the
        key's default)."""
        self.kernel = kernel
        self._candidates = candidates
        self.interpreter = interpreter
        self._autotuned: dict = {}  # key -> (winner, {str(config): ms or why it failed})

    def candidates(self, key: tuple) -> list:
        return list(self._candidates(key))

    def default(self, key: tuple):
        return self.candidates(key)[0]

    def choose(self, key: tuple, run: Optional[Callable[[object], object]] = None):
        """The config for this key (the rules are in the module docstring); run(config) launches the
        kernel with a config, and is used only when autotuning."""
        autotune = autotune_requested()  # a bad value raises here, in the interpreter too
        if triton_interpreting():
            config = self.interpreter if self.interpreter is not None else self.default(key)
            return self._record(key, config, "interpreter")
        found = self.candidates(key)
        if run is None or len(found) == 1 or not autotune:
            return self._record(key, found[0], "default")
        if key not in self._autotuned:
            self._autotuned[key] = self._time_each(key, found, run)
        winner, timings = self._autotuned[key]
        return self._record(key, winner, "autotuned", timings)

    def _time_each(self, key: Hashable, found: list, run: Callable) -> tuple:
        timings, best = {}, None
        for config in found:
            try:
                ms = _time_ms(lambda: run(config))
            except Exception as e:  # a config this GPU cannot launch (out of resources) is a result
                lines = str(e).strip().splitlines()
                timings[str(config)] = f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
                continue
            timings[str(config)] = ms
            if best is None or ms < best[1]:  # strictly faster: the earlier candidate wins ties
                best = (config, ms)
        if best is None:
            raise RuntimeError(f"vlfast {self.kernel}: autotuning {key}: no candidate config ran: {timings}")
        return best[0], timings

    def _record(self, key: Hashable, config, source: str, timings: Optional[dict] = None):
        entry = {"config": str(config), "source": source}
        if timings is not None:
            entry["ms"] = dict(timings)
        _CHOSEN.setdefault(self.kernel, {})[key] = entry
        return config


def chosen(prefix: str = "", forget: bool = False) -> dict:
    """{kernel: {str(key): {"config", "source"[, "ms"]}}} of the kernels whose names start with prefix,
    as chosen so far in this process (bench rows record it). forget=True clears those records, so
    that the next call's choices are all that is reported; autotuned winners are kept."""
    names = [name for name in _CHOSEN if name.startswith(prefix)]
    out = {name: {str(key): dict(entry) for key, entry in _CHOSEN[name].items()} for name in names}
    if forget:
        for name in names:
            del _CHOSEN[name]
    return out


def describe() -> dict:
    """Where launch configs come from in this process; "summary" is one line for `python -m vlfast info`."""
    out = {"interpreter": triton_interpreting(), "autotune": None, "error": None}
    try:
        out["autotune"] = autotune_requested()
    except ValueError as e:
        out["error"] = str(e)
        out["summary"] = f"{e} (the Triton kernels will raise)"
        return out
    if out["interpreter"]:
        out["summary"] = "the Triton interpreter: each kernel's interpreter config, never timed"
    elif out["autotune"]:
        out["summary"] = (f"{ENV_VAR}=1: on a GPU each kernel times its candidate configs on the first call "
                          "of each key and keeps the fastest for the process")
    else:
        out["summary"] = f"each kernel's built-in default ({ENV_VAR}=1 times the candidates instead)"
    return out
