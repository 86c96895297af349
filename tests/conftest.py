from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip on a user's machine."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared test data not found at {SHARED_DATA} (only present in the development workspace)"
        )
    return SHARED_DATA


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for tests of tiny tensors: a second thread costs more in
    synchronisation than it gives, on a shared CPU most of all."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
