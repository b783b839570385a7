"""Shared fixtures. Real data lives in ../shared/data beside the checkout."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("VO_SHARED_DATA", ROOT.parent / "shared" / "data"))


def require_data(*parts: str) -> Path:
    """Path under the shared data; a failure under CI=true, a skip elsewhere."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        msg = f"shared data missing: {path}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Test tensors are small: on a 2-core machine OpenMP hand-offs cost more than they save."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    return require_data()
