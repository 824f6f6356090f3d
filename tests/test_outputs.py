"""Output paths are checked before the work starts (issue #14, item 5, in part): a path inside a file or a
folder where a file is expected gives one line, exit status 2, and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from eclsnn.cli import main

RUN = Path(__file__).parent / "fixtures" / "main-0.1.0" / "run"


@pytest.fixture
def blocker(tmp_path) -> Path:
    f = tmp_path / "a-file"
    f.write_text("not a folder")
    return f


@pytest.mark.parametrize("argv", [
    lambda b: ["convert", str(RUN), "-o", str(b / "snn")],
    lambda b: ["export", str(RUN), "-o", str(b / "snn.npz")],
    lambda b: ["export", str(RUN), "--format", "json", "-o", str(b / "deeper" / "snn.json")],
    lambda b: ["evaluate", str(RUN), "--max-samples", "8", "--no-progress", "--json", str(b / "eval.json")],
    lambda b: ["train", "--output", str(b / "runs"), "--epochs", "1"],
])
def test_a_path_through_a_file_is_one_line_and_exit_2(argv, blocker, capsys):
    code = main(argv(blocker))
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("eclsnn: error: ") and err.count("\n") == 1, err
    assert f"{blocker} is a file, not a folder" in err
    assert "converted" not in out and "exported" not in out and "images, T =" not in out  # before any work
    assert sorted(p.name for p in blocker.parent.iterdir()) == ["a-file"]  # nothing left behind


def test_a_folder_where_a_file_is_expected(tmp_path, capsys):
    target = tmp_path / "snn.npz"
    target.mkdir()
    assert main(["export", str(RUN), "-o", str(target)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
