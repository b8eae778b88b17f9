"""Shared fixtures: a small synthetic dataset generated once per test session."""
import pytest
import torch

# One intra-op thread: the tests' tensors are small, and on a shared 2-core CI box a pool of OpenMP
# threads spin-waits for milliseconds on every tiny op (measured: 1000x slower small batched matmuls).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A datasets root holding ``synthetic/{train,val}`` (12 train, 4 val images)."""
    from cutler.data.synthetic import ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("datasets")
    ensure_synthetic_dataset(root, num_train=12, num_val=4, seed=0)
    return root
