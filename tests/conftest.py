"""Shared fixtures: paths to ../shared, tiny models, CPU threads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
REFERENCE = SHARED / "reference"

sys.path.insert(0, str(Path(__file__).parent))  # fake_engines


def need(path: Path) -> Path:
    """Skip the test with a clear reason when a shared file is absent."""
    if not path.exists():
        pytest.skip(f"shared data not available: {path} (tests read ../shared beside the repo)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test (on a shared 2-core machine, one thread per process beats
    two oversubscribed ones); the previous count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model():
    import torch

    from bosam_cli.model import build_preset

    torch.manual_seed(0)
    return build_preset("tiny").eval()


# The export and engine tests' fixtures, module-scoped as they were in each module: every test
# module that asks for them gets its own tiny checkpoint and export.
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny checkpoint the exports come from."""
    import engine_fixtures

    return engine_fixtures.tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny export of the tiny checkpoint: (engine folder, manifest)."""
    import engine_fixtures

    return engine_fixtures.tiny_export(tmp_path_factory)
