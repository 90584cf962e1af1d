"""Fixtures for tests/distributed; the helpers live in distributed_runs.py."""

from __future__ import annotations

import pytest

from distributed_runs import Runs


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("dist-runs"))
