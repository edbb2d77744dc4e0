"""What the command-line scripts share: a quiet end when stdout's reader has gone, and one-line errors.

Python ignores ``SIGPIPE``, so ``python scripts/sweep.py --grid molf --list | head`` used to end in a
``BrokenPipeError`` traceback once ``head`` had read its lines. ``run_cli`` runs a command's ``main``
and ends it quietly instead, as ``ls`` or ``grep`` end. It is called from the scripts' ``__main__``
blocks only, so tests that call ``main`` in-process see the exception as it is.

``report_error`` prints an error that says what to fix as one line (``MOLF_TRACEBACK=1``: the
traceback instead), for ``src/script/train.py`` and ``python -m molf.eval``.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional


def run_cli(main: Callable[[], Optional[int]]) -> int:
    """Call ``main()`` and return its exit status (None counts as 0). When the reader of stdout has
    gone away, stdout is pointed at the null device (so the interpreter's last flush cannot raise
    again) and the status is 1: the output was cut short, but there is no traceback."""
    try:
        status = main()
        sys.stdout.flush()  # a closed pipe can first show at this flush
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status or 0


def report_error(err: Exception, status: int, hint: bool = True) -> int:
    """Print ``err`` as one ``error:`` line on stderr and return ``status``; with ``MOLF_TRACEBACK=1``
    re-raise it instead (call it from the ``except`` block that caught ``err``). ``hint``: end the line
    with how to see the traceback (left out for flag errors, which the line itself explains)."""
    if os.environ.get("MOLF_TRACEBACK") == "1":
        raise err
    where = " (MOLF_TRACEBACK=1 shows where it was raised)" if hint else ""
    print(f"error: {' '.join(str(err).split())}{where}", file=sys.stderr)
    return status
