"""Shared test configuration: the three layers are folders (unit, contract, e2e), each a pytest marker."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("unit", "contract", "e2e")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(REPO / "tests").parts
        if parts and parts[0] in LAYERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def output_dir() -> Path:
    """Where tests leave what a person may want to look at (screenshots, images): TUNE_TEST_OUTPUT or
    test-output/ in the checkout."""
    d = Path(os.environ.get("TUNE_TEST_OUTPUT", REPO / "test-output"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny tensors run ~10x faster on one thread on this shared 2-core machine (no effect on a started webui)."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
