"""The report behind `python -m vlfast info`: versions, the device, and which implementations can run.

Ops are found, not listed: every package under vlfast/ops/ that defines
`implementation_status(device, dtype)` gets a section, so a new op needs no entry here. Every Triton
kernel picks its launch configs the same way (vlfast/_launch_configs.py): one line says how.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import platform
from importlib import metadata
from typing import Optional

import torch

ENV_VARS = ("VLFAST_IMPL", "VLFAST_NVTX", "TRITON_INTERPRET")


def dist_version(dist: str) -> Optional[str]:
    # Read from package metadata: importing triton just to print its version can fail or be slow.
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cuda() -> Optional[dict]:
    if not torch.cuda.is_available():
        return None
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                     "sm_count": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1)})
    return {"cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "gpus": gpus}


def op_modules() -> dict:
    """{op name: module} for every op package that reports its implementations."""
    import vlfast.ops
    found = {}
    for info in pkgutil.iter_modules(vlfast.ops.__path__):
        module = importlib.import_module(f"vlfast.ops.{info.name}")
        if hasattr(module, "implementation_status"):
            found[info.name] = module
    return found


def _auto_choice(op: str, device: torch.device, status: dict) -> str:
    """What impl="auto" does here (VLFAST_IMPL included), by the dispatcher's own rule."""
    from vlfast._dispatch import resolve_impl
    try:
        return "runs " + resolve_impl(op, "auto", device, {k: (lambda r=r: r) for k, r in status.items()})
    except Exception as e:  # VLFAST_IMPL names something unavailable or invalid
        return f"raises {type(e).__name__}: {e}"


def _extension_info(ext, reason: Optional[str]) -> dict:
    """Whether vlfast._C is there; if so what it was built with (archs, CUDA, compilers) and its ops."""
    if ext is None:
        return {"built": False, "reason": reason}
    return {"built": True, "reason": None, "ops": list(getattr(ext, "OPS", ())), **ext.build_info()}


def collect() -> dict:
    """Everything `info` prints, as plain JSON-able data."""
    import vlfast
    from vlfast import _launch_configs as launch_configs
    from vlfast._backends import extension

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ext, ext_reason = extension()
    ops = {}
    for name, module in op_modules().items():
        # Each op's own default dtype: the one its kernels are tuned for.
        status = module.implementation_status(device)
        ops[name] = {"device": str(device), "impls": status, "auto": _auto_choice(name, device, status)}
    return {
        "vlfast": vlfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "numpy": dist_version("numpy"),
        "cuda": _cuda(),
        "env": {k: os.environ.get(k) for k in ENV_VARS},
        "extension": _extension_info(ext, ext_reason),
        "launch_configs": launch_configs.describe(),
        "cpu_fp32_gemm": _cpu_fp32_gemm(),
        "ops": ops,
    }


def _cpu_fp32_gemm() -> dict:
    """Which library runs the CPU paths' float32 GEMMs (vlfast._gemm.cpu_fp32_gemm), and why."""
    from vlfast import _env, _gemm
    override = _env._raw("VLFAST_CPU_FP32_GEMM") or None  # as _gemm reads it
    try:
        library = _gemm.cpu_fp32_gemm()
    except (RuntimeError, ValueError) as e:  # a bad or unrunnable override: info reports it, ops raise it
        return {"library": None, "vendor": _gemm._cpu_vendor(), "override": override, "error": str(e)}
    return {"library": library, "vendor": _gemm._cpu_vendor(), "override": override, "error": None}


def format_report(info: dict) -> str:
    lines = [f"vlfast   {info['vlfast']}", f"python   {info['python']}", f"torch    {info['torch']}",
             f"triton   {info['triton'] or 'not installed'}", f"numpy    {info['numpy'] or 'not installed'}"]
    cuda = info["cuda"]
    if cuda is None:
        lines.append("cuda     no CUDA device")
    else:
        lines.append(f"cuda     runtime {cuda['cuda_runtime']}, cuDNN {cuda['cudnn']}")
        for g in cuda["gpus"]:
            lines.append(f"  gpu {g['index']}  {g['name']}, sm_{g['capability'].replace('.', '')}, "
                         f"{g['sm_count']} SMs, {g['memory_gib']} GiB")
    lines.append("env      " + ", ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in info["env"].items()))
    ext = info["extension"]
    if ext["built"]:
        lines.append(f"vlfast._C built for sm_{', sm_'.join(ext['archs'])}: CUDA {ext['cuda']} (nvcc {ext['nvcc']}, "
                     f"{ext['host_compiler']}), cudart {ext['cudart']}, {ext['nvtx']}; ops: {', '.join(ext['ops'])}")
    else:
        lines.append(f"vlfast._C not built: {ext['reason']}")
    lines.append(f"configs  {info['launch_configs']['summary']}")
    gemm = info["cpu_fp32_gemm"]
    why = (f"VLFAST_CPU_FP32_GEMM={gemm['override']}" if gemm["override"]
           else f"default for {gemm['vendor'] or 'an unknown CPU vendor'}; VLFAST_CPU_FP32_GEMM=blas|onednn overrides")
    lines.append(f"cpu gemm float32 products of the CPU paths: {gemm['library'] or gemm['error']} ({why})")
    for op, entry in info["ops"].items():
        lines.append(f"{op} (inputs on {entry['device']}):")
        lines.append(f"  {'auto':<10} {entry['auto']}")
        for impl, reason in entry["impls"].items():
            lines.append(f"  {impl:<10} " + ("available" if reason is None else f"unavailable: {reason}"))
    return "\n".join(lines)
