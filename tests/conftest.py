from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.fixtures.plugin"]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
