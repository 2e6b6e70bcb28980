"""examples/train_dalle.py under 2 gloo ranks: every stage trains data-parallel and rank 0 alone reports."""
import pytest

from ..nn.common import spawn_world
from .dalle_worker import run_rank

pytestmark = pytest.mark.distributed


def test_two_ranks_train_and_rank_zero_reports(tmp_path):
    ranks = spawn_world(run_rank, 2, tmp_path)
    assert set(ranks[0]["report"]["CLIP's pick"]) == {"colour", "shape", "place", "all"}
    assert ranks[1]["report"] == {}
