"""vlfast/bench/bench_attention_decode.py: its mask arithmetic is vlfast.masks', and a tiny run gives rows
with errors against its float64 oracle, GB/s and peak memory."""
import torch

from vlfast import masks
from vlfast.bench import bench_attention_decode as B
from vlfast.bench import runner


def test_the_bench_mask_rules_are_vlfast_masks():
    pos = torch.arange(B.TEXT + B.GRID * B.GRID)
    q, k = pos[:, None], pos[None, :]
    for kind in ("row", "column", "conv"):
        want = masks.dalle(B.TEXT, B.GRID, B.GRID, kind, kernel=11).allowed(q, k)
        assert torch.equal(B.keep_rule(f"dalle-{kind}")(q, k), want), kind
    assert torch.equal(B.keep_rule("causal")(q, k), masks.causal().allowed(q, k))


def test_oracle_is_softmax_attention_over_the_kept_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 13, 8, generator=g), torch.randn(2, 2, 13, 8, generator=g)
    dense = torch.rand(13, generator=g)[None, None, None] > 0.4
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                                            v.double().repeat_interleave(2, 1), attn_mask=dense)
    torch.testing.assert_close(B.oracle(q, k, v, dense), want)


def test_tiny_run_rows():
    rows = []
    runner.run_op(B.OP, B, torch.device("cpu"), "tiny", {}, rows.append)
    ran = {r["impl"]: r for r in rows if r["status"] == "ok"}
    assert {"vlfast-torch", "sdpa[contiguous cache]", "sdpa[gathered pages]"} <= set(ran)
    for r in ran.values():
        assert r["error"] < 1e-5 and r["gbps"] > 0 and r["peak_bytes"] is not None, r
    # the tiny case is paged: SDPA on the contiguous cache is its bar, the gathered pages its peer
    assert ran["sdpa[contiguous cache]"]["bar"] and not ran["sdpa[gathered pages]"]["bar"]
