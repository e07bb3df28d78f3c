"""``moezoo fit`` with 2 CPU processes (DDP + EP=2) matches the 1-process run; checkpoints cross over both ways."""

from __future__ import annotations

import pytest
import torch

from moezoo.tasks.vision import ImageClassificationTask
from tests.parallel.dist_utils import run_ranks
from tests.parallel.lightning_workers import STEPS, fit, fit_args, fit_worker, probe_inputs

pytestmark = pytest.mark.slow  # two Lightning fits in 2 spawned processes plus one in-process: ~1-2 min on 2 cores

WORLD = 2
LOSS_RTOL = 1e-3  # per step; the only modelled difference is the balance loss, computed per rank's batch
OUT_ATOL, OUT_RTOL = 1e-5, 1e-5  # the same weights through the sharded and the single-process layer (fp32)


def _checkpoint(root):
    found = sorted((root / "checkpoints").glob("*.ckpt"))
    assert found, f"no checkpoint under {root}"
    return found[-1]


def _outputs(path, rank):
    model = ImageClassificationTask.load_from_checkpoint(path, map_location="cpu").eval()
    with torch.no_grad():
        return model(probe_inputs(rank))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_fit")
    one = fit(fit_args(out / "one", 1, STEPS, strategy="auto"), ranks=tuple(range(WORLD)))
    one_ckpt = _checkpoint(out / "one")
    run_ranks(fit_worker, WORLD, args=(str(out), str(one_ckpt)), timeout_s=240)
    two = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return dict(out=out, one=one, one_ckpt=one_ckpt, two=two)


def test_two_process_loss_curve_matches_one_process(runs):
    one = torch.tensor(runs["one"].losses)
    two = torch.tensor([r["losses"] for r in runs["two"]]).mean(0)  # each rank's loss is its half-batch mean
    assert len(one) == len(two) == STEPS
    print(f"1 process: {one.tolist()}\n2 processes (mean of ranks): {two.tolist()}")
    print(f"largest relative gap {float(((two - one) / one).abs().max()):.2e}")
    torch.testing.assert_close(two, one, rtol=LOSS_RTOL, atol=0.0)
    assert one[-1] < one[0]


def test_both_start_from_the_same_weights_and_end_close(runs):
    for rank in range(WORLD):
        outputs = runs["two"][rank]["outputs"]
        torch.testing.assert_close(
            outputs["start"][rank], runs["one"].outputs["start"][rank], atol=OUT_ATOL, rtol=OUT_RTOL
        )
        end_gap = (outputs["end"][rank] - runs["one"].outputs["end"][rank]).abs().max()
        print(f"rank {rank}: largest logit gap after {STEPS} steps {float(end_gap):.2e}")


def test_two_process_checkpoint_loads_in_one_process(runs):
    ckpt = _checkpoint(runs["out"] / "two")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["state_dict"]["model.blocks.0.ffn.experts.w_in"].shape[0] == 4  # the full expert set
    for rank in range(WORLD):
        expected = runs["two"][rank]["outputs"]["end"][rank]
        torch.testing.assert_close(_outputs(ckpt, rank), expected, atol=OUT_ATOL, rtol=OUT_RTOL)


def test_one_process_checkpoint_resumes_in_two_processes(runs):
    for rank in range(WORLD):
        restored = runs["two"][rank]["resumed"]["start"][rank]
        torch.testing.assert_close(restored, _outputs(runs["one_ckpt"], rank), atol=OUT_ATOL, rtol=OUT_RTOL)
        assert len(runs["two"][rank]["resumed_losses"]) == 2  # resumed at step 6, ran to step 8
