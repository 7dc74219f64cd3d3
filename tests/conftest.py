"""Shared test setup: the slow tier (real packaged models, extended test matrices) runs only with ECOSPA_SLOW=1."""

from __future__ import annotations

import os
import warnings

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ECOSPA_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow tier: set ECOSPA_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
