"""The certified CPU paths (codebook_lookup, similarity_topk) bound float32 GEMM errors as IEEE float32:
where a setting lets PyTorch drop precision (oneDNN's bf16 / tf32 modes, by the new per-backend API or the
legacy setter) they must take their float64 references instead, and never fail on reading the setting.
Each case runs in a fresh process: these settings are process-wide and the two APIs do not mix back."""
import subprocess
import sys

import pytest

CHECK = """
import torch, vlfast
from vlfast import _gemm
{setup}
assert not _gemm.ieee_fp32_gemms(torch.device("cpu"))
g = torch.Generator().manual_seed(0)
z, e = torch.randn(300, 48, generator=g), torch.randn(100, 48, generator=g)
calls = []
from vlfast.ops.codebook_lookup import reference as cref
from vlfast.ops.similarity_topk import reference as sref
for module, name in ((cref, "lookup"), (sref, "similarity_topk")):
    real = getattr(module, name)
    setattr(module, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
index, _ = vlfast.codebook_lookup(z, e, impl="torch")
want = torch.cdist(z.double(), e.double()).argmin(dim=1)
assert torch.equal(index, want)
top, _ = vlfast.similarity_topk(z, e, 5, impl="torch")
assert torch.equal(top, (z.double() @ e.double().T).topk(5, dim=1).indices)
assert calls == ["lookup", "similarity_topk"], calls
print("ok")
"""


@pytest.mark.parametrize("setup", [
    "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'",
    "torch.backends.fp32_precision = 'tf32'",
    "torch.set_float32_matmul_precision('medium')",
])
def test_reduced_precision_gemms_take_the_float64_reference(setup):
    result = subprocess.run([sys.executable, "-c", CHECK.format(setup=setup)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_default_settings_are_ieee():
    import torch
    from vlfast import _gemm
    assert _gemm.ieee_fp32_gemms(torch.device("cpu"))
