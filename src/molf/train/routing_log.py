"""Writer of ``molf_routing.jsonl`` (format: docs/DEVELOPING.md, "Routing log").

Each line is serialized first and written with a single ``write`` call followed by a flush, so a
killed run leaves whole JSON lines (at worst the OS drops the last one). Resuming truncates the log
to the checkpoint's step, so the steps replayed after a resume are not logged twice.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any, Callable, Optional, Sequence

import torch

LOG_FILENAME = "molf_routing.jsonl"
VERSION = 1


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def step_record(decision: Any, step: int) -> dict[str, Any]:
    """One step line from a ``RoutingDecision`` with one device-to-host copy.

    ``decision.scores`` is ``(M, E)`` fp32 (``-inf`` padding), ``decision.winners`` ``(M, E)`` bool.
    """
    num_experts = decision.scores.shape[1]
    packed = torch.cat([decision.scores.float(), decision.winners.float()], dim=1)  # (M, 2E)
    rows = packed.cpu().tolist()  # the one host copy of this step
    return {
        "type": "step",
        "step": int(step),
        "winners": [[e for e in range(num_experts) if row[num_experts + e] > 0.5] for row in rows],
        "scores": [[_finite_or_none(s) for s in row[:num_experts]] for row in rows],
    }


def truncate_jsonl(path: Path, step: int, drop: Optional[Callable[[dict], bool]] = None,
                   edit_header: Optional[Callable[[dict], dict]] = None) -> None:
    """Rewrite a JSONL log (routing log or ``metrics.jsonl``) for a run resumed at ``step``: keep the
    header (through ``edit_header`` when given) and the lines with ``step <= step`` (except those
    ``drop`` picks), and stop at a torn last line of a killed run. The file is replaced atomically, so
    a crash here loses nothing."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line of a killed run
            if drop is not None and drop(record):
                continue
            if record.get("type") == "header" and edit_header is not None:
                kept.append(json.dumps(edit_header(record), allow_nan=False) + "\n")
            elif record.get("type") == "header" or int(record.get("step", 0)) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def read_header(path: Path) -> Optional[dict[str, Any]]:
    """The header record of a routing log, or None when the file is missing, empty or starts otherwise."""
    path = Path(path)
    if not path.exists():
        return None
    with path.open("r", encoding="utf-8") as handle:
        first = handle.readline()
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and record.get("type") == "header" else None


def replace_first_line(path: Path, record: dict[str, Any]) -> None:
    """Replace the first line of a JSONL file by ``record`` (atomically, like ``truncate_jsonl``)."""
    path = Path(path)
    with path.open("r", encoding="utf-8") as handle:
        handle.readline()
        rest = handle.read()
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, allow_nan=False) + "\n" + rest, encoding="utf-8")
    os.replace(tmp, path)


def truncate_routing_log(path: Path, step: int) -> None:
    """``truncate_jsonl`` for a routing log resumed at ``step``; the header's ``every_changes`` entries
    from ``step`` on (made by a later resume that is being redone) go too."""
    def cut_changes(header: dict) -> dict:
        kept = [change for change in header.get("every_changes", []) if change[0] < step]
        rest = {key: value for key, value in header.items() if key != "every_changes"}
        return {**rest, "every_changes": kept} if kept else rest

    truncate_jsonl(path, step, edit_header=cut_changes)


class RoutingLogWriter:
    """Appends routing decisions to ``<run_dir>/molf_routing.jsonl``; the header is written once.

    Args:
        path: the log file.
        ranks: rank per expert in routing order (``None`` for the FFT expert).
        score_fn: ``molf_score_fn`` of the run.
        topk: ``molf_topk`` of the run.
        every: log every this many optimizer steps.
    """

    def __init__(self, path: Path, ranks: Sequence[Optional[int]], score_fn: str, topk: int, every: int) -> None:
        self.path = Path(path)
        self.meta = {"ranks": list(ranks), "score_fn": score_fn, "topk": int(topk), "every": int(every)}
        self._handle: Optional[IO[str]] = None
        self._has_header = False

    def truncate_after(self, step: int) -> None:
        """Keep the header and the step lines with ``step <= step``; drop a torn last line."""
        truncate_routing_log(self.path, step)

    def start(self, module_names: Sequence[str], expert_names: Sequence[str], step: int) -> None:
        """Write the header at the start of training (``step`` = the optimizer steps already taken), so
        that even a run that logs no step has one. A resumed run keeps its header; when it logs at
        another interval than the header's, ``every_changes`` gets ``[step, every]``: the lines after
        ``step`` are ``every`` apart."""
        header = read_header(self.path)
        if header is None:
            self._write_header(module_names, expert_names)
            return
        changes = header.get("every_changes", [])
        current = changes[-1][1] if changes else header.get("every")
        if current != self.meta["every"]:
            header["every_changes"] = [*changes, [int(step), self.meta["every"]]]
            replace_first_line(self.path, header)

    def write(self, decision: Any, step: int) -> None:
        """Append the line of optimizer step ``step`` (and the header first if the file has none)."""
        if self._handle is None:
            self._open()
        if not self._has_header:
            self._write_header(decision.module_names, decision.expert_names)
        self._write_line(step_record(decision, step))

    def _write_header(self, module_names: Sequence[str], expert_names: Sequence[str]) -> None:
        if self._handle is None:
            self._open()
        self._write_line({"type": "header", "version": VERSION, "modules": list(module_names),
                          "experts": list(expert_names), **self.meta})
        self._has_header = True

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._has_header = self.path.exists() and self.path.stat().st_size > 0
        self._handle = self.path.open("a", encoding="utf-8")

    def _write_line(self, record: dict[str, Any]) -> None:
        assert self._handle is not None
        self._handle.write(json.dumps(record, allow_nan=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
