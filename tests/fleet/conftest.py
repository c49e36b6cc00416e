"""Fleet fixtures: the hub's migrated databases (SQLite and PostgreSQL) and its image store,
shared with the hub tests, and a tiny real model package with a folder of frames for agents."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

# the hub tests' fixtures: hub_db (a migrated database per db_url), store, data_dir, ...
from tests.hub.conftest import cheap_password_hashes, data_dir, hub_db, migrated_sqlite, store  # noqa: F401


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-built "darkness" ONNX package the agent tests use (no training)."""
    from tests.package_factory import build_package

    return build_package(tmp_path_factory.mktemp("pkg") / "darkness.kdpkg", metrics={})


@pytest.fixture(scope="session")
def plate_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve plates the darkness model scores, every third with a dark spot (class "plate")."""
    from tests.package_factory import plate

    folder = tmp_path_factory.mktemp("plates")
    rng = np.random.default_rng(3)
    for i in range(12):
        cv2.imwrite(str(folder / f"{i:04d}.png"), plate(rng, i % 3 == 0))
    return folder
