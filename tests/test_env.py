"""VLFAST_* environment variables: a malformed value is a clear error naming the variable, at the point
where the variable is read (import time for the chunk sizes and NVTX, each call for POISON / AUTOTUNE)."""
import os
import subprocess
import sys

import pytest


def _run(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VLFAST_")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)


@pytest.mark.parametrize("name,module", [("VLFAST_CLIP_CHUNK_BYTES", "vlfast"),  # read when vlfast imports
                                         ("VLFAST_LCE_CHUNK_BYTES", "vlfast.ops.linear_cross_entropy.triton")])
@pytest.mark.parametrize("value", ["32MiB", "-4096", "0", "1.5"])
def test_import_refuses_a_malformed_chunk_size(name, module, value):
    result = _run(f"import {module}", **{name: value})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"ValueError: environment variable {name} must be a positive integer, got {value!r}", last


@pytest.mark.parametrize("value", ["yes", "2", "true", "-1"])
def test_import_refuses_a_malformed_nvtx_flag(value):
    result = _run("import vlfast", VLFAST_NVTX=value)
    assert result.returncode != 0
    assert f"ValueError: environment variable VLFAST_NVTX must be 0 or 1, got {value!r}" in result.stderr


@pytest.mark.parametrize("code,name", [
    ("import torch, vlfast._scratch as s; s.empty(3, dtype=torch.float32, device='cpu')", "VLFAST_POISON"),
    ("import vlfast._launch_configs as c; c.autotune_requested()", "VLFAST_AUTOTUNE"),
])
def test_flags_read_per_call_refuse_malformed_values(code, name):
    result = _run(code, **{name: "on"})
    assert result.returncode != 0
    assert f"ValueError: environment variable {name} must be 0 or 1, got 'on'" in result.stderr


def test_well_formed_values_are_used():
    code = ("import torch, vlfast\n"
            "from vlfast.ops.clip_loss import partials\n"
            "from vlfast.ops.linear_cross_entropy import triton as lce\n"
            "from vlfast import _nvtx, _scratch\n"
            "print(partials.GRAD_CHUNK_BYTES, lce.CHUNK_BYTES, _nvtx.ENABLED,\n"
            "      bool(_scratch.empty(2, dtype=torch.float32, device='cpu').isnan().all()))")
    result = _run(code, VLFAST_CLIP_CHUNK_BYTES="4096", VLFAST_LCE_CHUNK_BYTES=" 8192 ", VLFAST_NVTX="0",
                  VLFAST_POISON="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4096", "8192", "False", "True"]
    defaults = _run(code)
    assert defaults.returncode == 0, defaults.stderr
    assert defaults.stdout.split()[:3] == ["None", str(32 << 20), "False"]


def test_the_helper_names_the_variable(monkeypatch):
    from vlfast import _env
    monkeypatch.setenv("VLFAST_TEST_VALUE", "x")
    with pytest.raises(ValueError, match="environment variable VLFAST_TEST_VALUE must be 0 or 1, got 'x'"):
        _env.flag("VLFAST_TEST_VALUE")
    with pytest.raises(ValueError, match="VLFAST_TEST_VALUE must be a positive integer, got 'x'"):
        _env.positive_int("VLFAST_TEST_VALUE", 7)
    monkeypatch.setenv("VLFAST_TEST_VALUE", "")
    assert _env.flag("VLFAST_TEST_VALUE") is False and _env.positive_int("VLFAST_TEST_VALUE", 7) == 7
    monkeypatch.setenv("VLFAST_TEST_VALUE", "1")
    assert _env.flag("VLFAST_TEST_VALUE") is True and _env.positive_int("VLFAST_TEST_VALUE", 7) == 1


def test_impl_choice_names_the_variable(monkeypatch):
    import torch
    import vlfast
    monkeypatch.setenv("VLFAST_IMPL", "fastest")
    with pytest.raises(ValueError, match="environment variable VLFAST_IMPL must be one of .*got 'fastest'"):
        vlfast.clip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0)


def test_a_variable_is_read_as_os_environ_holds_it_now(monkeypatch):
    """_raw answers an unset name from os.environ's own mapping: setting, changing and deleting the variable
    through os.environ (as monkeypatch does) shows at the next read; values are stripped."""
    from vlfast import _env
    monkeypatch.delenv("VLFAST_TEST_VAR", raising=False)
    assert _env._raw("VLFAST_TEST_VAR") == ""
    monkeypatch.setenv("VLFAST_TEST_VAR", " torch ")
    assert _env._raw("VLFAST_TEST_VAR") == "torch"
    monkeypatch.setenv("VLFAST_TEST_VAR", "reference")
    assert _env._raw("VLFAST_TEST_VAR") == "reference"
    monkeypatch.delenv("VLFAST_TEST_VAR")
    assert _env._raw("VLFAST_TEST_VAR") == ""
