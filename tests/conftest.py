"""Session set-up for the whole suite (helpers live in run_helpers.py).

Every test process gets its own data cache (FINETUNE_CACHE) so runs never see a stale cache
from outside the test session, and W&B / HF stay offline.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
