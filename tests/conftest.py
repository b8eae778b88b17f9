"""Shared fixtures: a small synthetic dataset generated once per test session."""
import os

import pytest
import torch

# Two cores on CI: keep intra-op threads modest so parallel pieces (workers, pools) do not thrash.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A datasets root holding ``synthetic/{train,val}`` (12 train, 4 val images)."""
    from cutler.data.synthetic import ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("datasets")
    ensure_synthetic_dataset(root, num_train=12, num_val=4, seed=0)
    return root
