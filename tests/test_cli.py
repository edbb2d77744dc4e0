"""molf._cli.run_cli: a command whose stdout reader goes away ends without a traceback."""

from __future__ import annotations

import subprocess
import sys

# Prints far more than a pipe buffer holds, so writing must go on after the reader has gone.
_FLOOD = "def main():\n    for _ in range(200_000):\n        print('x' * 100)\n"


def _read_one_line_then_close(code: str) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "x" * 100
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.stderr.close()
    return proc.wait(timeout=60), stderr


def test_plain_main_shows_the_broken_pipe_traceback():
    # The situation run_cli is for: without it, Python prints a BrokenPipeError traceback.
    status, stderr = _read_one_line_then_close(_FLOOD + "main()\n")
    assert status != 0
    assert "BrokenPipeError" in stderr


def test_run_cli_ends_quietly_with_status_1():
    code = "import sys\nfrom molf._cli import run_cli\n" + _FLOOD + "sys.exit(run_cli(main))\n"
    status, stderr = _read_one_line_then_close(code)
    assert status == 1
    assert stderr == ""


def test_run_cli_passes_the_status_through():
    code = "import sys\nfrom molf._cli import run_cli\nsys.exit(run_cli(lambda: {}))\n"
    assert subprocess.run([sys.executable, "-c", code.format("3")], capture_output=True).returncode == 3
    assert subprocess.run([sys.executable, "-c", code.format("None")], capture_output=True).returncode == 0
