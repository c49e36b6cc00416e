"""Agent test fixtures: a small, real model package (tests/package_factory.py: a hand-built
ONNX graph, no training) and folders of plates, every third with a dark spot."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.package_factory import build_package, plate


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_package(tmp_path_factory.mktemp("pkg") / "darkness.kdpkg", metrics={})


@pytest.fixture
def plates(tmp_path: Path):
    """A folder of n plates, every third with a spot; returns (folder, {name: has_spot})."""

    def make(n: int, corrupt: int = 0) -> tuple[Path, dict[str, bool]]:
        folder = tmp_path / "frames"
        folder.mkdir(exist_ok=True)
        rng = np.random.default_rng(7)
        truth = {}
        for i in range(n):
            name = f"{i:04d}.png"
            truth[name] = i % 3 == 0
            cv2.imwrite(str(folder / name), plate(rng, truth[name]))
        for j in range(corrupt):
            data = (folder / "0001.png").read_bytes()
            (folder / f"{n + j:04d}.png").write_bytes(data[: len(data) // 3])   # truncated file
        return folder, truth

    return make
