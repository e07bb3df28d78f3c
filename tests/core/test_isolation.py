"""The suite's own isolation (tests/conftest.py): state one test changes does not reach the next test."""

import os

import lightning
import torch


def test_a_test_may_change_threads_and_the_seed_environment():
    torch.set_num_threads(1)
    lightning.seed_everything(123)
    assert torch.get_num_threads() == 1 and os.environ["PL_GLOBAL_SEED"] == "123"


def test_the_next_test_starts_from_the_suite_settings():
    # runs after the test above (pytest keeps a file's order): its changes were undone
    assert torch.get_num_threads() == 2
    assert os.environ.get("PL_GLOBAL_SEED") != "123"
