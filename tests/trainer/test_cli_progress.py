"""What `kdfleet train` and `kdfleet evaluate` tell the person waiting: the expected time of a
training run before its first epoch ends, and progress per class while evaluating (the yardstick too)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.trainer.tiny_data import make_tiny_set


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_set(tmp_path_factory.mktemp("tiny"))


def test_train_says_how_long_it_will_take_before_the_first_epoch_ends(tiny: Path, tmp_path: Path, capsys) -> None:
    from trainer.cli import train_main

    assert train_main(["--data", str(tiny), "--epochs", "2", "--size", "64", "--batch-size", "4",
                       "--out", str(tmp_path / "run"), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    expected = re.search(r"expected time: about (\d+ s|\d+ min|\d+ h \d+ min) more \(2 epochs of (\d+) steps\)", err)
    assert expected, err
    assert expected.start() < err.index("epoch 1/2"), "the estimate comes first"
    assert "--epochs 8 --size 128" in err and err.count("expected time") == 1


def test_evaluate_reports_each_class_of_the_model_and_of_the_yardstick(tiny: Path, tmp_path: Path, capsys) -> None:
    from trainer.cli import evaluate_main, train_main

    assert train_main(["--data", str(tiny), "--epochs", "1", "--size", "64", "--batch-size", "8",
                       "--out", str(tmp_path / "run"), "--threads", "1"]) == 0
    ckpt = capsys.readouterr().out.strip().splitlines()[-1]
    assert evaluate_main([ckpt, "--yardstick", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    for who in ("best.pt", "yardstick"):
        for n, cls in enumerate(("disc", "stripes"), 1):
            assert re.search(rf"\]\s+{who}: class {cls} \({n}/2\)", captured.err), captured.err
    assert "verdict:" in captured.out
