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
