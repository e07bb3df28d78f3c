"""The crash soak (tests/soak.py): real ``moezoo fit`` subprocesses killed with SIGKILL at seeded random points and
resumed to the end; final weights against an uninterrupted run, and every file under the run folder loads.

Equal weights are asserted for resumes from end-of-epoch checkpoints (after validation), the case where moezoo
promises them (single process; :class:`moezoo.tasks.callbacks.ResumableRandomState`). A resume from the middle of an
epoch is not exact with Lightning's plain DataLoaders (the epoch restarts at its first batch); the "last" soak resumes
from the newest checkpoint of any kind and asserts intact files and a run that ends, not equal weights.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.soak import soak

ROOT = Path(__file__).resolve().parents[2]
SMOKE = sorted((ROOT / "configs" / "smoke").glob("*.yaml"))
# Two epochs where a config has one, so that a resume from an epoch end is possible before the run ends.
TWO_EPOCHS = ("--trainer.max_epochs", "2")
SHORT = (
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.num_sanity_val_steps",
    "0",
)


def _assert_sound(result, exact: bool) -> None:
    assert not result.problems, "\n".join(result.problems)
    assert result.files_checked > 0
    assert result.kills >= 1, result.attempts
    assert all(a.returncode in (0, -9) for a in result.attempts), result.attempts
    if exact:
        assert result.final_step == result.reference_step, result
        assert result.max_weight_diff == 0.0, f"resumed weights differ by {result.max_weight_diff}: {result}"


def test_soak_short_vision_kill_and_resume_from_epoch_ends_gives_the_same_weights(tmp_path):
    """Default tier: one config cut to 2 epochs of 2 batches, one kill (seed 0: in the second epoch, so the resume
    starts from the epoch-0 end)."""
    config = ROOT / "configs" / "smoke" / "vision_digits_moe_vit.yaml"
    result = soak(config, tmp_path, seed=0, kills=1, resume="epoch_end", extra_args=SHORT)
    _assert_sound(result, exact=True)
    assert any(a.resumed_step for a in result.attempts), "no attempt resumed from a checkpoint"


def test_resumable_random_state_round_trips_through_a_weights_only_load(tmp_path):
    from moezoo.tasks.callbacks import random_state, set_random_state

    state = random_state()
    torch.save({"s": state}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(2), random.random())
    set_random_state(torch.load(tmp_path / "s.pt", weights_only=True)["s"])
    again = (torch.rand(3), np.random.rand(2), random.random())
    torch.testing.assert_close(again[0], expected[0], rtol=0, atol=0)
    assert (again[1] == expected[1]).all() and again[2] == expected[2]


@pytest.mark.slow
@pytest.mark.parametrize("config", SMOKE, ids=lambda p: p.stem)
def test_soak_every_smoke_config_resumed_from_epoch_ends_gives_the_same_weights(config, tmp_path):
    result = soak(config, tmp_path, seed=11, kills=3, resume="epoch_end", test_after_fit=True, extra_args=TWO_EPOCHS)
    _assert_sound(result, exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("config", SMOKE, ids=lambda p: p.stem)
def test_soak_every_smoke_config_resumed_from_the_newest_checkpoint_ends_with_intact_files(config, tmp_path):
    result = soak(config, tmp_path, seed=12, kills=3, resume="last", test_after_fit=True, extra_args=TWO_EPOCHS)
    _assert_sound(result, exact=False)
    assert result.final_step >= result.reference_step, result
