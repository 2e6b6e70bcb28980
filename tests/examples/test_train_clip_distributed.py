"""examples/train_clip.py in 2 gloo ranks follows the single-process run with the whole batch.

Each rank takes half of every global batch; ClipLoss(local_loss, gather_with_grad) plus DDP's
gradient averaging make the update that of the whole batch, so the losses and the weights after a
few steps match one process's up to float32 rounding.
"""
import pytest
import torch

from ..nn.common import spawn_world
from .common import import_train_clip
from .train_worker import ARGS, run_rank

pytestmark = pytest.mark.distributed


def test_two_ranks_match_one_process(tmp_path):
    ranks = spawn_world(run_rank, 2, tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: the same kernels, the same rounding
    try:
        single = import_train_clip().main(ARGS)
    finally:
        torch.set_num_threads(threads)
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    want = single["model"].state_dict()
    torch.manual_seed(0)  # the example's seed: the weights before training
    before = import_train_clip().CLIP(single["model"].config).state_dict()
    moved = max((want[k] - before[k]).abs().max().item() for k in want)
    assert moved > 1e-3, moved  # the comparison below is 100 times finer than the training's steps
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), f"ranks disagree on {name}"
        if name.endswith("attn.qkv.bias"):
            # The key bias shifts every score of a row alike, so softmax gives it no gradient: its
            # updates are rounding noise scaled up by Adam, and differ between the runs more.
            (q, k, v), (q1, k1, v1) = value.chunk(3), want[name].chunk(3)
            torch.testing.assert_close(k, k1, rtol=0, atol=2e-4, msg=lambda m: f"{name} (keys): {m}")
            value, expected = torch.cat([q, v]), torch.cat([q1, v1])
        else:
            expected = want[name]
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert len(single["losses"]) == 4 and single["losses"][-1] < single["losses"][0]
