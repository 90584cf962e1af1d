"""Session set-up for the whole suite (helpers live in run_helpers.py).

Every test session gets its own data caches (FINETUNE_CACHE, HF_DATASETS_CACHE) so runs never see a stale cache
from outside the test session, and W&B / HF stay offline.
"""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The datasets library's cache, new for the session and set before datasets is imported: a stale
# cache of an earlier session's local "Hub" repo would serve its old rows.
# Under pytest-xdist each worker gets its own (the workers inherit the controller's environment):
# two workers' dataset repos of the same name and layout, written in the same second, hash alike.
if os.environ.get("PYTEST_XDIST_WORKER") or "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="finetune-tests-hf-datasets-")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``-n 2 --dist loadgroup``, the README's test command) a test file runs
    whole on one worker (its module fixtures are built once), and the SLURM tests share one worker
    (one local cluster: their jobs would queue behind each other's and time out)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        path = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group("slurm" if path.startswith("tests/slurm/") else path))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("finetune-cache")
    old = os.environ.get("FINETUNE_CACHE")
    os.environ["FINETUNE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("FINETUNE_CACHE", None)
    else:
        os.environ["FINETUNE_CACHE"] = old
