"""Where the rows go: the run's metadata, the stdout table, the JSON file and the PNG plot."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent


def _git_sha() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:  # not a git checkout (the GPU machine gets a copy of the tree)
        return None
    return out.stdout.strip() or None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from vlfast import _gemm
    vendor = _gemm._cpu_vendor() or "unknown vendor"
    return (f"cpu ({platform.machine()}, {vendor}, {torch.get_num_threads()} threads, "
            f"float32 GEMMs: {_gemm.cpu_fp32_gemm()})")


def metadata_fields(device: torch.device) -> dict:
    """The fields every row carries, so one row read alone says where and with what it was measured."""
    import vlfast
    from vlfast._info import dist_version
    return {"device": device_name(device), "torch": torch.__version__, "triton": dist_version("triton"),
            "python": platform.python_version(), "vlfast": vlfast.__version__, "git_sha": _git_sha()}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonable(x):
    # NaN and inf are not JSON: keep them visible as strings rather than dropping them to null.
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_json(rows: list, path: str) -> None:
    """Rewritten after every row (atomically), so a run cut short by a timeout still leaves its rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(rows), indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: str) -> list:
    """The rows of a run saved with --json."""
    try:
        rows = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"op", "case", "impl", "status"} <= set(r)
                                             for r in rows):
        raise ValueError(f"{path}: expected the JSON list of rows that `python -m vlfast bench --json` writes")
    return rows


def _fmt(x, spec: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return format(x, spec)


HEADER = ("case", "impl", "dtype", "mode", "ms", "TFLOP/s", "GB/s", "peak MiB", "max rel err", "note")
LEFT = 4  # the first four columns are text, aligned left; numbers align right


def table(rows: list) -> str:
    """Measured and failed rows (skipped ones go to the summary); errors are max |x-ref| / max |ref|."""
    body = []
    for r in rows:
        if r["status"] == "skipped":
            continue
        peak = r["peak_bytes"] / 2**20 if r["peak_bytes"] is not None else None
        note = r["message"] if r["status"] == "error" else (r["error_note"] or "")
        body.append([r["case"], r["impl"], r["dtype"], r["mode"], _fmt(r["ms"], ".3f"), _fmt(r["tflops"], ".3g"),
                     _fmt(r.get("gbps"), ".4g"), _fmt(peak, ".1f"), _fmt(r["error"], ".2e"), note[:100]])
    widths = [max(len(line[i]) for line in [HEADER] + body) for i in range(len(HEADER) - 1)]
    return "\n".join("  ".join([c.ljust(w) if i < LEFT else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
                               + [line[-1]]).rstrip() for line in [HEADER] + body)


def summary(rows: list) -> str:
    """Contenders that did not run, once each with the reason and how many cases it missed."""
    seen = {}
    for r in rows:
        if r["status"] == "skipped":
            seen.setdefault((r["impl"], r["message"]), set()).add(r["case"])
    if not seen:
        return "skipped: none"
    return "skipped:\n" + "\n".join(f"  {impl}: {why} ({len(c)} case{'s' * (len(c) > 1)})"
                                    for (impl, why), c in seen.items())


# "Correct" for the ratio table: within 2 % of float64 in every output and gradient, no index (codebook
# code, top-k entry) other than float64's, and the same greedy tokens as float64 / the peer's reference.
CORRECT_WITHIN = 0.02
MUST_BE_ZERO = ("index_mismatch", "tokens")
CORRECT_RULE = "correct = within 2 % of float64, no wrong index, the same greedy tokens"


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)  # a saved run keeps NaN / inf as strings


def correct(row: dict) -> bool:
    if row["status"] != "ok" or not _number(row["ms"]) or not _number(row["error"]):
        return False
    errors = row.get("errors") or {}
    return row["error"] <= CORRECT_WITHIN and all(errors.get(k, 0) == 0 for k in MUST_BE_ZERO)


def ratios(rows: list) -> list:
    """Per (op, case, dtype, mode): vlfast's fastest correct row against the fastest correct peer.

    Returns dicts {op, case, dtype, mode, impl, ms, peer, peer_ms, wrong_peers, ratio, bars}; peer is None
    when no peer is correct (wrong_peers names them), and ratio is None then. bars: (impl, ms) of the
    case's correct bars (Contender.bar), which are never the peer."""
    groups = {}
    for r in rows:
        if r["status"] == "ok" and r["ms"] is not None:
            groups.setdefault((r["op"], r["case"], r["dtype"], r["mode"]), []).append(r)
    out = []
    for (op, case, dtype, mode), rs in groups.items():
        ours = sorted((r for r in rs if r["impl"].startswith("vlfast-") and correct(r)), key=lambda r: r["ms"])
        peers = [r for r in rs if not r["impl"].startswith("vlfast-") and not r.get("bar")]
        bars = [(r["impl"], r["ms"]) for r in rs if r.get("bar") and correct(r)]
        if not ours or not peers:
            continue
        good = sorted((r for r in peers if correct(r)), key=lambda r: r["ms"])
        best = good[0] if good else None
        out.append({"op": op, "case": case, "dtype": dtype, "mode": mode, "impl": ours[0]["impl"],
                    "ms": ours[0]["ms"], "peer": best and best["impl"], "peer_ms": best and best["ms"],
                    "wrong_peers": [r["impl"] for r in peers if not correct(r)],
                    "ratio": best and ours[0]["ms"] / best["ms"], "bars": bars})
    return out


def ratio_table(rows: list, others: tuple = ()) -> str:
    """The ratios as a Markdown table (the README's CPU table is this, for one quick run). others: the rows
    of more runs; a last column then gives each row's lowest and highest ratio over all the runs, where a
    busy host moves single rows from run to run."""
    head, rule = "| op | case | mode | vlfast, ms | fastest correct peer, ms | ratio |", "|---|---|---|---|---|---|"
    if others:
        head, rule = head + f" ratio over {len(others) + 1} runs |", rule + "---|"
    spread = {}
    for run in (rows, *others):
        for r in ratios(run):
            if r["ratio"] is not None:
                spread.setdefault((r["op"], r["case"], r["dtype"], r["mode"]), []).append(r["ratio"])
    lines = [head, rule]
    for r in ratios(rows):
        wrong = f" ({', '.join(r['wrong_peers'])}: wrong)" if r["wrong_peers"] and r["peer"] else ""
        peer = (f"{r['peer']} {r['peer_ms']:.2f}{wrong}" if r["peer"]
                else f"none correct ({', '.join(r['wrong_peers'])} wrong)")
        peer += "".join(f" (bar, not a peer: {name} {ms:.2f})" for name, ms in r.get("bars", ()))
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "—"
        ours = r["impl"][len("vlfast-"):]
        line = f"| {r['op']} | {r['case']} | {r['mode']} | {ours} {r['ms']:.2f} | {peer} | {ratio} |"
        if others:
            seen = spread.get((r["op"], r["case"], r["dtype"], r["mode"]))
            line += f" {min(seen):.2f}–{max(seen):.2f} ({len(seen)}) |" if seen else " — |"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list, path: str) -> Optional[str]:
    """Grouped bars per (case, mode), log-scale ms; returns why there is no plot, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: matplotlib does not import ({e}); pip install matplotlib"
    timed = [r for r in rows if r["ms"] is not None]
    if not timed:
        return "no plot: no row was timed"
    groups = list(dict.fromkeys(f"{r['case']}\n{r['mode']}" for r in timed))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.5))
    for k, impl in enumerate(impls):
        ms = {f"{r['case']}\n{r['mode']}": r["ms"] for r in timed if r["impl"] == impl}
        xs = [i for i, g in enumerate(groups) if g in ms]
        ax.bar([i + (k - (len(impls) - 1) / 2) * width for i in xs], [ms[groups[i]] for i in xs], width, label=impl)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log)")
    ax.set_xticks(range(len(groups)), groups, rotation=60, ha="right", fontsize=7)
    ax.set_title(f"{timed[0]['op']} on {timed[0]['device']}" if len({r["op"] for r in timed}) == 1
                 else f"vlfast bench on {timed[0]['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
