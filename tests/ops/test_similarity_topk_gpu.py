"""vlfast.similarity_topk with keys in host memory and queries on a GPU (run by benchmarks/gpu_check.sh)."""
import pytest
import torch

import vlfast

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("pinned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_host_keys_stream_to_the_same_top_k_as_device_keys(pinned, dtype):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(20011, 64, generator=g).to(dtype)
    keys[[5000, 15000]] = keys[17].clone()  # equal scores in different blocks: the lower index first
    host = keys.pin_memory() if pinned else keys
    q = torch.cat([keys[17:18], torch.randn(300, 64, generator=g).to(dtype)]).cuda()
    for k in (1, 10, 300):
        want = vlfast.similarity_topk(q, keys.cuda(), k, impl="torch")
        for block in (0, 4096, 7777):
            got = vlfast.similarity_topk(q, host, k, key_block=block, impl="torch")
            assert got[0].device == q.device
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (k, block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("n,m,d,k", [(1, 1, 3, 1), (37, 1013, 24, 7), (300, 20011, 100, 1000), (2048, 100003, 512, 10),
                                     (64, 300007, 256, 4096)])
def test_triton_kernel_equals_the_exact_torch_path(dtype, metric, n, m, d, k):
    """The compiled emit kernel (tensor cores; bf16x3 for fp32) with the sampled thresholds of M >= 4096:
    the same top k and scores as the torch path (itself checked against the definition), and on random
    data no row needs the fallback."""
    from vlfast.ops.similarity_topk import triton as topk_triton
    g = torch.Generator(device="cuda").manual_seed(n + m)
    q = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).to(dtype)
    keys = torch.nn.functional.normalize(torch.randn(m, d, device="cuda", generator=g), dim=1).to(dtype)
    keys[m // 2] = keys[0]  # a duplicate: the lower index first
    want = vlfast.similarity_topk(q, keys, k, metric=metric, impl="torch")
    got = vlfast.similarity_topk(q, keys, k, metric=metric, impl="triton")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert topk_triton.last_call["fallback"] == 0, topk_triton.last_call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_near_ties_and_host_keys(dtype):
    """Planted near-ties (1e-7 apart) and duplicates decided by float64; host keys streamed to the kernel."""
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(50021, 64, generator=g)
    keys[30000:30040] = keys[11]
    for j in range(40000, 40030):
        keys[j] = keys[12] * (1 + (j - 40015) * 1e-7)
    keys = keys.to(dtype)
    q = torch.cat([keys[11:13], torch.randn(200, 64, generator=g).to(dtype)]).cuda()
    for k in (1, 25, 100):
        want = vlfast.similarity_topk(q, keys.cuda(), k, impl="torch")
        for host in (False, True):
            got = vlfast.similarity_topk(q, keys if host else keys.cuda(), k, key_block=7777 if host else 0,
                                         impl="triton")
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (k, host)
