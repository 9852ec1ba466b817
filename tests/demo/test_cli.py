"""The command line: bad arguments end in one line on stderr and a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gradcache_cli import _main


def _run_main(argv, capsys):
    try:
        status = _main.main(argv)
    except SystemExit as exit_:  # argparse's own errors exit from inside
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


BAD = [
    (["demo", "--chunk-size", "256", "--batch-size", "128"], "must not exceed --batch-size"),
    (["demo", "--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    (["demo", "--chunk-size", "-4"], "--chunk-size: expected a positive integer"),
    (["demo", "--epochs", "zero"], "--epochs: expected a positive integer, got 'zero'"),
    (["demo", "--lr", "-1"], "--lr: expected a positive number"),
    (["demo", "--backend", "mxnet"], "invalid choice: 'mxnet'"),
    (["demo", "--model", "minilm", "--backend", "tf"], "runs on the torch backend only"),
    (["demo", "--test-fraction", "1.5"], "--test-fraction must be between 0 and 1"),
    (["demo", "--dropout", "1"], "--dropout must be in [0, 1)"),
    (["demo", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ([], "required: COMMAND"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) or "nothing" for a, _ in BAD])
def test_bad_arguments_give_one_line_and_exit_2(argv, message, capsys):
    status, out, err = _run_main(argv, capsys)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err, err
    assert err.startswith("gradcache")


def test_python_dash_m_gives_no_traceback():
    # `python -m gradcache_cli` is the console script's command line
    done = subprocess.run([sys.executable, "-m", "gradcache_cli", "demo", "--chunk-size", "9",
                           "--batch-size", "8"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gradcache demo: error: --chunk-size (9) must not exceed --batch-size (8)"]
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_help_and_version(capsys):
    status, out, _ = _run_main(["--version"], capsys)
    assert status == 0 and out.startswith("gradcache ")
    status, out, _ = _run_main(["demo", "--help"], capsys)
    assert status == 0 and "--chunk-size" in out and "--backend" in out
