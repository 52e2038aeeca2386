"""Shared test setup: deterministic, single-threaded torch (2 shared CPU cores in CI)."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
