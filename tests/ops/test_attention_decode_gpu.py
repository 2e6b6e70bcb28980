"""The Triton and CUDA C++ decode kernels on a GPU at real sizes (run by benchmarks/gpu_check.sh): bf16 / fp16 caches,
contiguous and paged, GQA, masks, splits, against float64 over the same keys."""
import pytest
import torch

import vlfast
from vlfast import masks

pytestmark = pytest.mark.gpu


def _float64(q, k, v, lengths, mask):
    """Row by row: vlfast.attention's reference in float64 over the row's first L_b keys."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for row, n in enumerate(lengths.tolist()):
        if n:
            out[row:row + 1] = vlfast.attention(q[row:row + 1].double(), k[row:row + 1, :, :n].double(),
                                                v[row:row + 1, :, :n].double(), mask=mask, impl="reference")
    return out


def _paged(cache, page, table=None):
    """Shuffled pages (num_pages, Hkv, page, D) and the block table (or the given table's layout)."""
    b, hkv, s, d = cache.shape
    per_row = -(-s // page)
    if table is None:
        table = torch.randperm(b * per_row, device=cache.device).view(b, per_row).to(torch.int32)
    pages = torch.zeros(b * per_row, hkv, page, d, dtype=cache.dtype, device=cache.device)
    padded = torch.nn.functional.pad(cache, (0, 0, 0, per_row * page - s))
    pages[table.long().flatten()] = padded.view(b, hkv, per_row, page, d).permute(0, 2, 1, 3, 4).reshape(-1, hkv, page, d)
    return pages, table


IMPLS = ["triton", "cuda"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,hq,hkv,s,d,page,sq", [(1, 32, 32, 4096, 128, None, 1), (4, 32, 8, 8192, 128, 16, 1),
                                                  (8, 16, 2, 1000, 64, 1, 4), (2, 8, 1, 3000, 256, 256, 16),
                                                  (3, 14, 2, 777, 80, None, 3)])
def test_against_float64(b, hq, hkv, s, d, page, sq, dtype, impl):
    torch.manual_seed(0)
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype)
    lengths = torch.randint(0, s + 1, (b,), device="cuda", dtype=torch.int32)
    lengths[0] = s
    want = _float64(q, k, v, lengths, masks.causal())
    kc, vc, table = k, v, None
    if page is not None:
        kc, table = _paged(k, page)
        vc, _ = _paged(v, page, table)
    for splits in (0, 1, 5):
        got = vlfast.attention_decode(q, kc, vc, lengths, block_table=table, mask=masks.causal(), num_splits=splits,
                                      impl=impl)
        err = (got.double() - want).abs().max().item() / want.abs().max().item()
        assert err < 1e-2, f"splits={splits}: relative error {err}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_dalle_masks(kind, impl):
    torch.manual_seed(1)
    b, h, d, text, rows, cols = 4, 16, 64, 256, 32, 32
    s = text + rows * cols
    q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([s, 700, 257, 1], device="cuda", dtype=torch.int32)
    mask = masks.dalle(text, rows, cols, kind, kernel=11)
    got = vlfast.attention_decode(q, k, v, lengths, mask=mask, impl=impl)
    want = _float64(q, k, v, lengths, mask)
    assert (got.double() - want).abs().max().item() / want.abs().max().item() < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_append_in_place(impl):
    torch.manual_seed(2)
    b, hkv, s, d = 3, 4, 512, 128
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k_new, v_new = torch.randn(b, hkv, 2, d, device="cuda", dtype=torch.bfloat16), torch.randn(b, hkv, 2, d, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([0, 100, 510], device="cuda", dtype=torch.int32)
    kc, vc = k.clone(), v.clone()
    q = torch.randn(b, 8, 2, d, device="cuda", dtype=torch.bfloat16)
    got = vlfast.attention_decode(q, kc, vc, lengths, k_new=k_new, v_new=v_new, mask=masks.causal(), impl=impl)
    for row, n in enumerate(lengths.tolist()):
        assert torch.equal(kc[row, :, n:n + 2], k_new[row]) and torch.equal(vc[row, :, n:n + 2], v_new[row])
        assert torch.equal(kc[row, :, :n], k[row, :, :n]) and torch.equal(kc[row, :, n + 2:], k[row, :, n + 2:])
    want = _float64(q, kc, vc, lengths + 2, masks.causal())
    assert (got.double() - want).abs().max().item() / want.abs().max().item() < 1e-2
