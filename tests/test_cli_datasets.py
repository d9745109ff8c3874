"""``python -m core datasets``: text and JSON summaries, and clean errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import build_parser, main

SPEC = "sample:shapes?per_class=8&size=32"
REPO = Path(__file__).resolve().parents[1]


def test_datasets_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets", SPEC]) == 0
    out = capsys.readouterr().out
    assert f"source:  {SPEC}" in out
    assert "classes: 3 (circle, square, triangle)" in out
    assert "predefined" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert lines["class"] == ["train", "val", "total"]
    for cls in ("circle", "square", "triangle"):
        assert lines[cls] == ["6", "2", "8"]
    assert lines["total"] == ["18", "6", "24"]
    assert "skipped: none" in out


def test_datasets_json_with_test_split(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            (root / cls / f"{i}.bmp").write_bytes(_bmp(i))
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["datasets", str(root), "--json", "--test-fraction", "0.2", "--seed", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["classes"] == ["a", "b"]
    assert data["counts"] == {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}}
    assert data["predefined_split"] is False
    assert data["skipped"][0]["file"] == "a/broken.png" and data["skipped"][0]["reason"]


def _bmp(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(buf, format="BMP")
    return buf.getvalue()


def test_bad_zip_exit_code_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_text("this is not a zip")
    assert main(["datasets", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a valid zip" in err and "Traceback" not in err


def test_unknown_sample_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets", "sample:shapez"]) == 2
    assert "Did you mean 'shapes'" in capsys.readouterr().err


def test_subprocess_entry_point(tmp_path: Path, lab_cache: Path) -> None:
    env = {**os.environ, "TRANSFER_LAB_CACHE": str(lab_cache), "PYTHONPATH": str(REPO)}
    ok = subprocess.run(
        [sys.executable, "-m", "core", "datasets", SPEC],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "circle" in ok.stdout and "triangle" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "core", "datasets", str(tmp_path / "missing.zip")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_parser_has_datasets_subcommand() -> None:
    args = build_parser().parse_args(["datasets", "x", "--val-fraction", "0.3"])
    assert args.command == "datasets" and args.val_fraction == 0.3 and args.seed == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["datasets", "x", "--val-fraction", "2"])


def test_user_error_is_one_line_but_a_bug_keeps_its_traceback(monkeypatch, capsys) -> None:
    import core.cli
    from core.config import ConfigError

    def user_mistake(args):
        raise ConfigError("epochs must be an integer from 1 to 1000, got 0.")

    monkeypatch.setattr(core.cli, "cmd_datasets", user_mistake)
    assert main(["datasets", SPEC]) == 2
    assert capsys.readouterr().err == "error: epochs must be an integer from 1 to 1000, got 0.\n"

    def bug(args):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(core.cli, "cmd_datasets", bug)
    with pytest.raises(ValueError, match="a bug"):  # not swallowed as a user error: the traceback reaches the user
        main(["datasets", SPEC])
    assert "error:" not in capsys.readouterr().err


def test_help_does_not_import_torch(tmp_path: Path) -> None:
    """`python -m core --help` stays fast: building every parser (defaults, help text) needs no torch."""
    code = ("import sys\n"
            "from core.cli import build_parser\n"
            "p = build_parser()\n"
            "for cmd in ('datasets', 'compare', 'train', 'bench', 'predict', 'backbones'):\n"
            "    try:\n"
            "        p.parse_args([cmd, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--config FILE" in proc.stdout and "[target_accuracy]" in proc.stdout


def test_training_flags_are_trainconfig_keys_and_bench_has_no_idle_flags() -> None:
    from core.config import FIELDS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    others = {"help", "data", "config", "val_fraction", "test_fraction", "out", "no_export", "explain", "mode"}
    for name in ("compare", "train", "bench"):
        dests = [a.dest for a in sub.choices[name]._actions]
        assert len(dests) == len(set(dests)), name  # every flag defined once
        assert set(dests) - others <= set(FIELDS), (name, set(dests) - others - set(FIELDS))
    bench = {s for a in sub.choices["bench"]._actions for s in a.option_strings}
    assert not {"--out", "--no-export", "--target", "--unfreeze"} & bench
    args = build_parser().parse_args(["compare", "--data", "x", "--out", "y", "--target", "0.5", "--unfreeze", "2"])
    assert (args.target_accuracy, args.unfreeze_blocks) == (0.5, 2)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--data", "x", "--out", "y"])
