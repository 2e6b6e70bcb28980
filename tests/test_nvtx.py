"""NVTX ranges: vlfast.<op>.<fwd|bwd> under the "vlfast" domain with VLFAST_NVTX=1, nothing otherwise."""
import os
import subprocess
import sys
import textwrap

from vlfast import _nvtx

# A stand-in for the `nvtx` package that records what it is asked to annotate.
FAKE_NVTX = '''
import contextlib
calls = []

@contextlib.contextmanager
def annotate(message, domain=None):
    calls.append((domain, message))
    yield
'''

SCRIPT = textwrap.dedent('''
    import torch, nvtx, vlfast
    a = torch.randn(5, 8, requires_grad=True)
    vlfast.clip_loss(a, torch.randn(5, 8), 2.0).backward()
    print(nvtx.calls)
''')


def _run(tmp_path, enabled):
    (tmp_path / "nvtx.py").write_text(FAKE_NVTX)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "VLFAST_NVTX": "1" if enabled else "0"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_ranges_under_the_vlfast_domain_when_enabled(tmp_path):
    assert _run(tmp_path, True) == str([("vlfast", "vlfast.clip_loss.fwd"), ("vlfast", "vlfast.clip_loss.bwd")])


def test_no_ranges_and_a_shared_null_context_when_disabled(tmp_path):
    assert _run(tmp_path, False) == "[]"
    if not _nvtx.ENABLED:
        assert _nvtx.nvtx_range("a") is _nvtx.nvtx_range("b")  # no allocation per call
