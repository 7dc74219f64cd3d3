"""Fuzz-suite setup: keep torch's DEBUG trace logging out of hypothesis failure reports."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True, scope="module")
def _quiet_torch_logs():
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)
