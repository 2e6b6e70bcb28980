"""VectorQuantizer over torch.distributed (gloo; process groups of 2, 3 and 4 ranks): every rank keeps
the same codebook (counts and sums all-reduced, k-means starts and dead-code restarts drawn on the
group's first rank), and the EMA equals one process's on the group's concatenated batch."""
import pytest
import torch

from .common import spawn_world
from .quantizer_worker import CONFIGS, GROUP_SIZES, N_LOCAL, WORLD, global_batches, make_quantizer, run_rank

pytestmark = pytest.mark.distributed
CASES = [(size, config) for size in GROUP_SIZES for config in CONFIGS]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_world(run_rank, WORLD, tmp_path_factory.mktemp("vq-world"))


@pytest.mark.parametrize("size,config", CASES, ids=lambda x: str(x))
def test_every_rank_keeps_the_same_codebook(ranks, size, config):
    first = ranks[0][size, config]
    for rank in range(1, size):
        for step, (state, want) in enumerate(zip(ranks[rank][size, config], first)):
            for key in want:
                assert torch.equal(state[key], want[key]), f"rank {rank} step {step}: {key} differs from rank 0"
    assert all((size, config) not in ranks[rank] for rank in range(size, WORLD))


@pytest.mark.parametrize("size", GROUP_SIZES)
def test_restarts_and_kmeans_happened(ranks, size):
    states = ranks[0][size, "kmeans+restarts"]
    assert all(bool(s["initted"]) for s in states)
    assert any((s["cluster_size"] == 0.7).any() for s in states), "no dead code restarted"
    assert any((s["cluster_size"] == 0.995).any() for s in ranks[0][size, "cosine+restarts"])


@pytest.mark.parametrize("size", GROUP_SIZES)
def test_ema_equals_one_process_on_the_whole_batch(ranks, size):
    vq = make_quantizer("ema")
    for step, batch in enumerate(global_batches(size)):
        assert batch.shape[0] == size * N_LOCAL
        vq(batch)
        for key, value in vq.state_dict().items():
            torch.testing.assert_close(ranks[0][size, "ema"][step][key], value, rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"step {step} {key}: {m}")
