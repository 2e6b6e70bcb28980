"""SelfAttention, CrossAttention and RotaryEmbedding against the same math written with SDPA in float64."""
import pytest
import torch
import torch.nn.functional as F

import vlfast.masks as M
from vlfast.nn import CrossAttention, RotaryEmbedding, SelfAttention

IMPLS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]


def _rotate_half_rope(x, positions, base=10000.0):
    """transformers' convention, written independently: x * cos + rotate_half(x) * sin."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv
    emb = torch.cat([ang, ang], dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return (x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()).to(x.dtype)


def test_rotary_matches_rotate_half_and_is_relative():
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 3, 11, 16, dtype=torch.float64)
    pos = torch.arange(11) + 5
    torch.testing.assert_close(rope(x, pos).double(), _rotate_half_rope(x, pos), rtol=1e-5, atol=1e-5)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    dots = [(rope(q[None, None, None], torch.tensor([m])) * rope(k[None, None, None], torch.tensor([m - 3]))).sum()
            for m in (3, 10, 40)]
    torch.testing.assert_close(dots[0], dots[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dots[0], dots[2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(15)


def _manual_self_attention(mod, x, dense, positions=None):
    b, s, _ = x.shape
    hq, hk, d = mod.num_heads, mod.num_kv_heads, mod.head_dim
    q, k, v = F.linear(x, mod.qkv.weight, mod.qkv.bias).split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = (t.view(b, s, -1, d).transpose(1, 2) for t in (q, k, v))
    if mod.rotary is not None:
        pos = positions if positions is not None else torch.arange(s)
        q, k = _rotate_half_rope(q, pos), _rotate_half_rope(k, pos)
    k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    return F.linear(out.transpose(1, 2).reshape(b, s, -1), mod.out.weight, mod.out.bias)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rotary", [False, True])
def test_self_attention_matches_manual(impl, rotary):
    torch.manual_seed(0)
    dtype = torch.float64 if impl == "reference" else torch.float32
    mod = SelfAttention(48, 6, num_kv_heads=2, rotary=rotary, impl=impl).to(dtype)
    x = torch.randn(2, 21, 48, dtype=dtype, requires_grad=True)
    mask = M.image_prefix(7, 21)
    got = mod(x, mask)
    got.square().sum().backward()
    g_got = [x.grad.clone()] + [p.grad.clone() for p in mod.parameters()]
    x.grad = None
    mod.zero_grad()
    want = _manual_self_attention(mod, x, mask.to_dense(21, 21)[:, None])
    want.square().sum().backward()
    g_want = [x.grad] + [p.grad for p in mod.parameters()]
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_self_attention_matches_padded(impl):
    """Packed sequences (cu_seqlens) give what each sequence alone gives, rotary positions restarting."""
    torch.manual_seed(0)
    dtype = torch.float64 if impl == "reference" else torch.float32
    mod = SelfAttention(32, 4, rotary=True, impl=impl).to(dtype)
    lengths = [5, 1, 9]
    xs = [torch.randn(n, 32, dtype=dtype) for n in lengths]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    packed = mod(torch.cat(xs), M.causal(), cu_seqlens=cu, max_seqlen=9)
    for i, xi in enumerate(xs):
        alone = mod(xi[None], M.causal())[0]
        tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(packed[cu[i]:cu[i + 1]], alone, **tol)


@pytest.mark.parametrize("positions", [None, "shifted", "per-row"])
def test_a_precomputed_rotation_equals_the_positions(positions):
    """rotation=rotary.rotation(positions) (what a model computes once for all its layers) gives what the
    layer gives from the positions, for (S,) and (B, S) positions; packed too."""
    torch.manual_seed(0)
    mod = SelfAttention(32, 4, num_kv_heads=2, rotary=True, impl="reference").double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    pos = {None: torch.arange(9), "shifted": torch.arange(9) + 7,
           "per-row": torch.stack([torch.arange(9), torch.arange(9) + 3])}[positions]
    want = mod(x, M.causal(), positions=None if positions is None else pos)
    got = mod(x, M.causal(), rotation=mod.rotary.rotation(pos, torch.float64))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    packed_pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4])
    want = mod(x[0], M.causal(), cu_seqlens=cu, max_seqlen=5)
    got = mod(x[0], M.causal(), cu_seqlens=cu, max_seqlen=5, rotation=mod.rotary.rotation(packed_pos, torch.float64,
                                                                                          packed=True))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no rotary embedding"):
        SelfAttention(32, 4).double()(x, rotation=mod.rotary.rotation(pos, torch.float64))


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_attention_with_padded_context(impl):
    torch.manual_seed(0)
    dtype = torch.float64 if impl == "reference" else torch.float32
    mod = CrossAttention(32, 4, context_dim=24, impl=impl).to(dtype)
    x, ctx = torch.randn(2, 7, 32, dtype=dtype), torch.randn(2, 13, 24, dtype=dtype)
    valid = torch.arange(13)[None, :] < torch.tensor([13, 6])[:, None]
    got = mod(x, ctx, M.key_padding(valid))
    q = F.linear(x, mod.q.weight, mod.q.bias).view(2, 7, 4, 8).transpose(1, 2)
    k, v = (t.view(2, 13, 4, 8).transpose(1, 2) for t in F.linear(ctx, mod.kv.weight, mod.kv.bias).chunk(2, -1))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
    want = F.linear(out.transpose(1, 2).reshape(2, 7, 32), mod.out.weight, mod.out.bias)
    torch.testing.assert_close(got, want, **(dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else {}))


def test_module_arguments_are_checked():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        SelfAttention(48, 6, num_kv_heads=4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SelfAttention(50, 6)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CrossAttention(50, 6)


def test_inputs_with_the_wrong_feature_size_are_named():
    attn = SelfAttention(12, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"SelfAttention: x must have last dimension 12, got shape \(2, 5, 10\)"):
        attn(torch.randn(2, 5, 10, dtype=torch.float64))
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"SelfAttention: x must have last dimension 12, got shape \(5, 13\)"):
        attn(torch.randn(5, 13, dtype=torch.float64), cu_seqlens=cu, max_seqlen=3)
    cross = CrossAttention(12, 3, context_dim=7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"CrossAttention: context must have last dimension 7, got shape \(2, 4, 12\)"):
        cross(torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 4, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"CrossAttention: x must have last dimension 12, got shape \(2, 5, 7\)"):
        cross(torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 4, 7, dtype=torch.float64))
