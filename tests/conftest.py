"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("transfer-lab-cache")


@pytest.fixture(autouse=True)
def lab_cache(_session_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point TRANSFER_LAB_CACHE at a temporary folder so tests never write into the home folder."""
    monkeypatch.setenv("TRANSFER_LAB_CACHE", str(_session_cache))
    return _session_cache
