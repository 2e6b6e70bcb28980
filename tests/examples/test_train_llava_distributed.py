"""LLaVA on 2 gloo CPU ranks: examples/train_llava.py under DistributedDataParallel, and FSDP2.

DDP: each rank takes half of every global batch and LLaVA.loss is the mean over that rank's answer
tokens; DDP averages the ranks' gradients. So the 2 ranks optimise the mean of the two halves' losses,
which is the whole batch's token mean only when both halves hold as many answer tokens. They do not
here (answers differ in length), so the example's 2-rank run follows a single process that averages
the two halves' losses (llava_worker.HalvesLoss), to float32 rounding, and not the single process on
the whole batch, which the test shows differs.

FSDP2: torch.distributed.fsdp.fully_shard on every vision block, every decoder layer and the root, over
a CPU device mesh of 2 gloo ranks (float64 and float32 work); LLaVA.loss is registered with
register_fsdp_forward_method (without it, loss() would see the root's parameters still sharded: "got
mixed torch.Tensor and DTensor"). Every row of the batch holds 5 answer tokens, so the ranks' mean
losses average to the whole batch's, and the gathered gradients and parameters after each AdamW step
must equal one process's on the whole batch: all parameters trainable, stage 2 (vision tower frozen),
and stage 1 (only the projector) followed by stage 2 on the same sharded model.
"""
import pytest
import torch

from ..nn.common import spawn_world
from . import llava_worker as w

pytest.importorskip("safetensors")
pytestmark = pytest.mark.distributed


def _one_thread(fn, *args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: the same kernels, the same rounding
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def _run_example(argv, loss_module=None) -> dict:
    m = w.import_train_llava()
    original = m.LossModule
    m.LossModule = loss_module or original
    try:
        return m.main(argv)
    finally:
        m.LossModule = original


def test_example_two_ranks_follow_the_mean_of_their_halves(tmp_path):
    w.write_clip(tmp_path)
    ranks = spawn_world(w.run_example_rank, 2, tmp_path)
    argv = w.example_args(tmp_path)
    halves = _one_thread(_run_example, argv, w.HalvesLoss)
    whole = _one_thread(_run_example, argv)
    for rank in ranks:
        for stage, steps in ((1, 3), (2, 4)):
            assert len(rank["losses"][stage]) == steps
            torch.testing.assert_close(torch.tensor(rank["losses"][stage]), torch.tensor(halves["losses"][stage]),
                                       rtol=1e-6, atol=1e-6)
    assert {"conversation", "description"} <= set(ranks[0]["accuracy"]) and ranks[1]["accuracy"] == {}

    m = w.import_train_llava()
    before = m.build(m.parse_args(argv), m.Words(), torch.device("cpu")).state_dict()
    want = halves["model"].state_dict()
    moved = {k: (want[k] - before[k]).abs().max().item() for k in want}
    assert min(v for k, v in moved.items() if not k.startswith("vision_tower.")) > 1e-3, moved
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), f"ranks disagree on {name}"
        if name.startswith("vision_tower."):  # frozen in both stages
            assert torch.equal(value, before[name]), name
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=lambda s: f"{name}: {s}")
    # The whole batch in one process weights answer tokens, not ranks, alike: a different trajectory.
    off = max((whole["model"].state_dict()[k] - want[k]).abs().max().item() for k in want)
    assert off > 1e-4 and whole["losses"][1][0] != pytest.approx(halves["losses"][1][0], rel=1e-6, abs=0), off


def test_fsdp2_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    ranks = spawn_world(w.run_fsdp_rank, 2, tmp_path)
    reference = _one_thread(w.fsdp_reference, 2)
    for name, p in ranks[0]["placements"]["all trainable"].items():  # really sharded: half of dim 0 per rank
        assert p[:2] == ("DTensor", "(Shard(dim=0),)"), (name, p)
    for name, dtype, stages in w.SCENARIOS:
        tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
        steps = zip(ranks[0]["results"][name], ranks[1]["results"][name], reference[name], stages)
        for step, (r0, r1, ref, stage) in enumerate(steps):
            where = f"{name}, step {step}"
            torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, ref["loss"], **tol)
            assert r0["loss"] != r1["loss"], where  # the ranks' batches differ
            for key, grad in ref["grads"].items():
                frozen = key.startswith("vision_tower.") if stage else False
                frozen = frozen or (stage == 1 and key.startswith("language_model."))
                got = r0["grads"][key]
                assert torch.equal(got, r1["grads"][key]) if got is not None else r1["grads"][key] is None, key
                if frozen or grad is None:
                    # frozen, or (vision_feature_layer -2) the tower's last block and ln_post: no gradient
                    assert got is None and grad is None, f"{where}: {key}"
                    continue
                assert got is not None, f"{where}: {key}"
                torch.testing.assert_close(got, grad, **tol, msg=lambda s: f"{where}: d {key}: {s}")
            for key, param in ref["params"].items():
                torch.testing.assert_close(r0["params"][key], param, **tol, msg=lambda s: f"{where}: {key}: {s}")
                assert torch.equal(r0["params"][key], r1["params"][key]), f"{where}: {key}"
    first = reference["all trainable"][0]
    assert sum(g is not None for g in first["grads"].values()) == len(first["grads"]) - 14  # the unused tail
