"""Time every launch-config candidate of vlfast's Triton attention kernels on this GPU and write the
winners as a tuned table (the format of vlfast/ops/attention/tuning.py). Needs a CUDA GPU.

    python benchmarks/tune_attention.py [--head-dims 64 128] [--kinds causal spans] [--out PATH]
                                        [--resume PATH] [--budget-s SECONDS]

For each head dim and mask kind, at B4 H16 S2048 bf16 (the DALL-E kinds: 256 text tokens and a 32 x 32
image grid, S = 1280): every forward candidate is timed alone (fwd), then every backward candidate as
forward + backward with the forward's winner (fwd+bwd), by triton.testing.do_bench's median. Each
candidate's results are first compared with the default config's; one that differs by more than
bf16 rounding is reported and never chosen. The winners go to --out (default $OUT/attention_tuned.json
when $OUT is set, else ./attention_tuned.json), rewritten after every (head dim, mask kind), with the
device, torch, triton and date of the run. Keys already in the output (or in --resume's table) are
skipped, so a run cut short by --budget-s or a timeout continues where it stopped.

To use the result, commit it as vlfast/ops/attention/tuned/<gpu>.json (h200.json for the H200):
vlfast then runs the winners on that GPU (`python -m vlfast info` says so). benchmarks/results/README.md
has the steps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script from a checkout: import vlfast from it
    sys.path.insert(0, str(ROOT))

import vlfast.masks as M  # noqa: E402
from vlfast.ops.attention import tuning  # noqa: E402

HEAD_DIMS = (64, 72, 80, 96, 104, 128, 256)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Results that differ from the default config's by more than this (max |x - x0| / max |x0|) are wrong.
AGREE = 2e-2


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    p.add_argument("--kinds", nargs="+", choices=tuning.KINDS, default=list(tuning.KINDS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048, help="tokens (the DALL-E kinds use 256 + 32 x 32)")
    p.add_argument("--window", type=int, default=512, help="the sliding window of the 'window' kind")
    p.add_argument("--prefix", type=int, default=576, help="the image prefix of the 'spans' kind (LLaVA)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--out", type=Path, help="default: $OUT/attention_tuned.json, else ./attention_tuned.json")
    p.add_argument("--resume", type=Path, help="start from this table (its keys are not measured again)")
    p.add_argument("--force", action="store_true", help="measure keys that the table already has")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="start no new (head dim, kind) after this many seconds (0: no limit)")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=50.0)
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="for testing this script: tiny shapes in the Triton interpreter on the CPU "
                        "(TRITON_INTERPRET=1), wall-clock timing; the numbers mean nothing")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path(os.environ["OUT"]) / "attention_tuned.json" if os.environ.get("OUT") else \
            Path("attention_tuned.json")
    return args


def _git_sha():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except OSError:
        return None


def _gpu(args) -> tuple:
    if args.cpu_dry_run:
        return "cpu dry run", "0.0"
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def _start_table(args, gpu: str, capability: str) -> dict:
    """The table to add to: --resume's, else --out's if it exists, else an empty one for this GPU."""
    source = args.resume or (args.out if args.out.exists() else None)
    if source is None:
        return tuning.empty_table(gpu, capability)
    table = tuning.load_table(source)
    if (table.gpu, table.capability) != (gpu, capability):
        raise SystemExit(f"tune_attention.py: {source} is for {table.gpu} (sm_{table.capability}), this is {gpu} "
                         f"(sm_{capability}); give another --out")
    versions = {"torch": torch.__version__, "triton": _triton_version()}
    stale = [f"{k} {table.measured[k]}" for k in versions if table.configs and table.measured[k] != versions[k]]
    if stale:
        raise SystemExit(f"tune_attention.py: {source} was measured with {', '.join(stale)}; this run has "
                         f"torch {versions['torch']}, triton {versions['triton']}. One table, one run's versions: "
                         "give another --out (or --force with a fresh --out to measure everything again)")
    print(f"starting from {source}: {len(table.configs)} entries", flush=True)
    return table.raw


def _triton_version():
    import triton
    return triton.__version__


def _shape(args, kind: str) -> tuple:
    """(batch, heads, tokens, DALL-E (text, rows, cols) or None)."""
    if args.cpu_dry_run:
        return 1, 2, (16 + 8 * 8 if kind.startswith("dalle") else 96), ((16, 8, 8) if kind.startswith("dalle") else None)
    if kind.startswith("dalle"):
        return args.batch, args.heads, 256 + 32 * 32, (256, 32, 32)
    return args.batch, args.heads, args.seq, None


def _mask(args, kind: str, batch: int, s: int, dalle, device):
    if kind == "none":
        return None
    if kind == "causal":
        return M.causal()
    if kind == "window":
        return M.sliding_window(min(args.window, max(1, s // 4)))
    if kind == "spans":
        return M.image_prefix(min(args.prefix, s // 3), s, device=device)
    if kind == "padding":  # bidirectional, each sequence padded to s from between s/2 and s tokens
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(s // 2, s + 1, (batch,), generator=g).to(device)
        return M.key_padding.from_lengths(lengths, s)
    return M.dalle(*dalle, kind.split("_")[1])


def _agree(got, want) -> float:
    """max |got - want| / max |want| over the tensors."""
    return max(float((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30))
               for g, w in zip(got, want))


def _timer(args):
    if args.cpu_dry_run:
        def wall(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return wall
    from triton.testing import do_bench
    return lambda fn: float(do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))


def _try(configs, results_of, timed, label):
    """{config: ms or None}, printing each; results_of(config) -> tensors to compare with the first's."""
    times, first = {}, None
    for config in configs:
        try:
            got = results_of(config)
            if first is None:
                first = got
            err = _agree(got, first)
            if err > AGREE:
                print(f"  {label} {config}: WRONG, differs from the default by {err:.2e}; not chosen", flush=True)
                times[config] = None
                continue
            times[config] = timed(config)
            print(f"  {label} {config}: {times[config]:.4f} ms", flush=True)
        except Exception as e:  # out of resources and the like: not a winner
            lines = str(e).strip().splitlines()
            print(f"  {label} {config}: {type(e).__name__}: {lines[0][:200] if lines else ''}", flush=True)
            times[config] = None
    return times


def _entry(times: dict, default) -> dict:
    ok = {c: ms for c, ms in times.items() if ms is not None}
    if not ok:
        raise RuntimeError("no candidate ran")
    winner = min(ok, key=ok.get)
    return {**winner.to_json(), "ms": round(ok[winner], 5),
            "default_ms": None if times.get(default) is None else round(times[default], 5),
            "candidates_ms": {str(c): None if ms is None else round(ms, 5) for c, ms in times.items()}}, winner


def tune_one(args, K, d: int, kind: str, timer) -> dict:
    """{table key: entry} for the forward and backward of one head dim and mask kind."""
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    dtype = DTYPES[args.dtype]
    b, h, s, dalle = _shape(args, kind)
    g = torch.Generator(device=device).manual_seed(d)
    q, k, v, do = (torch.randn(b, h, s, d, device=device, generator=g).to(dtype) for _ in range(4))
    mask = _mask(args, kind, b, s, dalle, device)
    p = K.Problem(q, k, v, None, None, s, s, mask, d ** -0.5)
    cls, bucket = tuning.dtype_class(dtype), tuning.head_dim_bucket(d)
    print(f"d{d} {kind} ({bucket}): B{b} H{h} S{s} {args.dtype}", flush=True)

    fwd = tuning.candidates(d, dtype, "fwd")
    fwd_times = _try(fwd, lambda c: [K.forward(p, c)[0]], lambda c: timer(lambda: K.forward(p, c)), "fwd")
    fwd_entry, fwd_winner = _entry(fwd_times, fwd[0])

    out, lse2 = K.forward(p, fwd_winner)

    def step(c):
        o, lse = K.forward(p, fwd_winner)
        return K.backward(p, do, o, lse, c)

    bwd = tuning.candidates(d, dtype, "bwd")
    bwd_times = _try(bwd, lambda c: list(K.backward(p, do, out, lse2, c)), lambda c: timer(lambda: step(c)),
                     "fwd+bwd")
    bwd_entry, bwd_winner = _entry(bwd_times, bwd[0])
    print(f"  -> fwd {fwd_winner} ({fwd_entry['ms']:.4f} ms, default {fwd_entry['default_ms']}), "
          f"bwd {bwd_winner} (fwd+bwd {bwd_entry['ms']:.4f} ms, default {bwd_entry['default_ms']})", flush=True)
    return {tuning.table_key(cls, bucket, kind, "fwd"): fwd_entry, tuning.table_key(cls, bucket, kind, "bwd"): bwd_entry}


def _measured(args, gpu: str, capability: str) -> dict:
    """The run behind the entries (tuning.MEASURED_FIELDS and more)."""
    if args.cpu_dry_run:
        shape, timing = "cpu dry run", "wall clock, one call"
    else:
        shape = f"B{args.batch} H{args.heads} S{args.seq} {args.dtype}; DALL-E kinds: 256 text + 32x32 image"
        timing = f"triton.testing.do_bench median, warmup {args.warmup_ms} ms, rep {args.rep_ms} ms"
    return {"device": gpu, "torch": torch.__version__, "triton": _triton_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "capability": capability,
            "python": sys.version.split()[0], "git_sha": _git_sha(), "shape": shape,
            "timing": timing + "; the bwd entries' times are forward + backward"}


def _write(path: Path, table: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    tmp.replace(path)
    tuning.load_table(path)  # what was written reads back under the format's rules


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if args.cpu_dry_run and not interpreting:
        raise SystemExit("tune_attention.py --cpu-dry-run: set TRITON_INTERPRET=1 (before Python starts)")
    if not args.cpu_dry_run:
        if not torch.cuda.is_available():
            raise SystemExit("tune_attention.py times the Triton attention kernels on a CUDA GPU, and there is "
                             "none here (torch.cuda.is_available() is False). Run it on the GPU machine, e.g. "
                             "through `SECTIONS=\"install tune\" bash benchmarks/gpu_check.sh`.")
        if interpreting:
            raise SystemExit("tune_attention.py: unset TRITON_INTERPRET; interpreted kernels cannot be timed")
    from vlfast.ops.attention import triton as K  # imports triton
    gpu, capability = _gpu(args)
    table = _start_table(args, gpu, capability)
    timer = _timer(args)
    t0, longest, done = time.monotonic(), 0.0, 0
    todo = [(d, kind) for d in args.head_dims for kind in args.kinds]
    for i, (d, kind) in enumerate(todo):
        cls, bucket = tuning.dtype_class(DTYPES[args.dtype]), tuning.head_dim_bucket(d)
        keys = [tuning.table_key(cls, bucket, kind, p) for p in tuning.PASSES]
        if not args.force and all(key in table["configs"] for key in keys):
            print(f"d{d} {kind}: in the table already (--force measures it again)", flush=True)
            continue
        elapsed = time.monotonic() - t0
        if args.budget_s and elapsed + longest > args.budget_s:
            left = ", ".join(f"d{dd} {kk}" for dd, kk in todo[i:])
            print(f"budget of {args.budget_s:.0f} s reached after {elapsed:.0f} s; not measured: {left}", flush=True)
            break
        started = time.monotonic()
        entries = tune_one(args, K, d, kind, timer)
        table["configs"].update(entries)
        table["measured"] = _measured(args, gpu, capability)
        _write(args.out, table)
        done += 1
        longest = max(longest, time.monotonic() - started)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"{done} (head dim, kind) pairs measured in {time.monotonic() - t0:.0f} s; "
          f"{len(table['configs'])} entries in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
