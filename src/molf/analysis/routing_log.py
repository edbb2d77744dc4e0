"""Read ``molf_routing.jsonl`` (ours and the reference's format) into arrays and a DataFrame.

The log is parsed line by line and each step is turned into a small ``(modules, experts)`` array at
once, so the raw text is never held in memory; a multi-thousand-step log of ~200 modules becomes a
few tens of MB of float64. A truncated last line (a run killed mid-write) is dropped with a warning;
a broken line anywhere else is an error, and so is a step record of our format whose ``scores`` or
``winners`` has not one row per module of the header, or whose winners are not indices of its
experts. A resumed run may log some steps twice: the last record of a step wins.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import pandas as pd

LOG_FILENAME = "molf_routing.jsonl"

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_RANK_RE = re.compile(r"_r(\d+)$")


def module_layer(name: str) -> int:
    """Decoder-layer index of a module name such as ``model.layers.3.self_attn.q_proj`` (-1 if none)."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else -1


def module_type(name: str) -> str:
    """Short type of a module name: ``...q_proj`` -> ``q``, ``...gate_proj`` -> ``gate``, else the last part."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf[: -len("_proj")] if leaf.endswith("_proj") else leaf


@dataclass
class RoutingLog:
    """A routing log as dense arrays: ``S`` logged steps, ``M`` modules, ``E`` experts.

    ``scores`` is NaN where a score was non-finite or a module has no such expert.
    """

    steps: np.ndarray  # (S,) int64, increasing
    modules: list[str]
    experts: list[str]
    scores: np.ndarray  # (S, M, E) float64
    winners: np.ndarray  # (S, M, E) bool
    ranks: list[Optional[int]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> np.ndarray:
        return np.array([module_layer(m) for m in self.modules], dtype=np.int64)  # (M,)

    @property
    def module_types(self) -> list[str]:
        return [module_type(m) for m in self.modules]

    def to_frame(self) -> pd.DataFrame:
        """Long DataFrame, one row per (step, module, expert): step, module, layer, module_type, expert, score,
        winner."""
        num_steps, num_modules, num_experts = self.scores.shape
        module_codes = np.tile(np.repeat(np.arange(num_modules), num_experts), num_steps)
        expert_codes = np.tile(np.arange(num_experts), num_steps * num_modules)
        types = self.module_types
        type_names = sorted(set(types), key=types.index)
        type_of_module = np.array([type_names.index(t) for t in types], dtype=np.int64)
        frame = pd.DataFrame({
            "step": np.repeat(self.steps, num_modules * num_experts),
            "module": pd.Categorical.from_codes(module_codes, categories=self.modules),
            "layer": self.layers[module_codes],
            "module_type": pd.Categorical.from_codes(type_of_module[module_codes], categories=type_names),
            "expert": pd.Categorical.from_codes(expert_codes, categories=self.experts),
            "score": self.scores.reshape(-1),
            "winner": self.winners.reshape(-1),
        })
        frame.attrs.update(self.meta, experts=list(self.experts), ranks=list(self.ranks))
        return frame


def _iter_records(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)``; a non-JSON last line warns and ends the stream."""
    pending_error: Optional[tuple[int, str]] = None
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if pending_error is not None:
                raise ValueError(f"{path}:{pending_error[0]}: not a JSON record ({pending_error[1]}); "
                                 "only the last line of a routing log may be truncated")
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                pending_error = (number, str(err))
    if pending_error is not None:
        warnings.warn(f"{path}:{pending_error[0]}: truncated last line dropped (the run was probably "
                      "interrupted while writing it)", stacklevel=3)


def _score(value: Any) -> float:
    if value is None:
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _check_rows(rows: Any, key: str, num_modules: int) -> None:
    """One row per module of the header; numpy would otherwise broadcast or reshape the rows."""
    if not isinstance(rows, list) or len(rows) != num_modules:
        found = f"{len(rows)} rows" if isinstance(rows, list) else type(rows).__name__
        raise ValueError(f"{key!r} has {found}, the header names {num_modules} modules")


def _score_rows(rows: Any, shape: tuple[int, int]) -> np.ndarray:
    """(M, E) float64 scores of a step; a module's missing trailing experts and null scores are NaN."""
    _check_rows(rows, "scores", shape[0])
    scores = np.full(shape, np.nan)
    try:
        # Fast path: every module has every expert; null -> NaN.
        array = np.asarray(rows, dtype=np.float64)
    except ValueError:  # ragged rows
        array = None
    if array is not None and array.shape == shape:
        scores[:] = array
    else:
        for i, row in enumerate(rows):
            if len(row) > shape[1]:
                raise ValueError(f"'scores' of module {i} has {len(row)} values, the header names {shape[1]} experts")
            scores[i, : len(row)] = [_score(v) for v in row]
    scores[~np.isfinite(scores)] = np.nan
    return scores


def _winner_rows(rows: Any, shape: tuple[int, int]) -> np.ndarray:
    """(M, E) bool winners of a step from one list of expert indices per module."""
    _check_rows(rows, "winners", shape[0])
    try:
        picks = np.asarray(rows, dtype=np.int64)  # (M, K) when every module has K winners (top-K)
    except ValueError:
        picks = None
    if picks is None or picks.ndim != 2:  # ragged rows
        picks = [np.asarray(row, dtype=np.int64).reshape(-1) for row in rows]
        flat = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
    else:
        flat = picks.reshape(-1)
    # A negative index would silently pick an expert from the end.
    outside = flat[(flat < 0) | (flat >= shape[1])]
    if outside.size:
        raise ValueError(f"'winners' holds expert index {outside[0]}, the header names {shape[1]} experts "
                         f"(0..{shape[1] - 1})")
    winners = np.zeros(shape, dtype=bool)
    if isinstance(picks, list):
        for i, row in enumerate(picks):
            winners[i, row] = True
    else:
        np.put_along_axis(winners, picks, True, axis=1)
    return winners


class _OursParser:
    """Steps of our format: ``{"type": "step", "step", "winners": [[i, ...]], "scores": [[...]]}``."""

    def __init__(self, header: dict):
        self.header = header
        self.modules = list(header["modules"])
        self.experts = list(header["experts"])
        self.steps: list[int] = []
        self.scores: list[np.ndarray] = []
        self.winners: list[np.ndarray] = []

    def add(self, record: dict) -> None:
        shape = (len(self.modules), len(self.experts))
        scores = _score_rows(record["scores"], shape)
        winners = _winner_rows(record["winners"], shape)
        self.steps.append(int(record["step"]))
        self.scores.append(scores)
        self.winners.append(winners)

    def finish(self) -> RoutingLog:
        shape = (0, len(self.modules), len(self.experts))
        meta = {k: v for k, v in self.header.items() if k not in ("type", "modules", "experts", "ranks")}
        meta["format"] = "molf"
        return RoutingLog(
            steps=np.asarray(self.steps, dtype=np.int64),
            modules=self.modules,
            experts=self.experts,
            scores=np.stack(self.scores) if self.scores else np.zeros(shape),
            winners=np.stack(self.winners) if self.winners else np.zeros(shape, dtype=bool),
            ranks=list(self.header.get("ranks") or [_rank_of(e) for e in self.experts]),
            meta=meta,
        )


class _ReferenceParser:
    """Steps of the reference format: ``{"step", "selections": {module: {"winners", "scores"}}}``.

    Winners may be expert names or indices; scores a dict name -> float or a list in expert order.
    Modules and experts are indexed in order of first appearance.
    """

    def __init__(self, experts: Optional[list[str]] = None):
        self.module_index: dict[str, int] = {}
        self.expert_index: dict[str, int] = {name: i for i, name in enumerate(experts or [])}
        self.steps: list[int] = []
        self.entries: list[list[tuple[int, list[int], list[float], list[int]]]] = []

    def _expert(self, key: Any) -> int:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if key < 0:
                raise ValueError(f"negative expert index {key}")
            while len(self.expert_index) <= key:
                self.expert_index.setdefault(f"expert{len(self.expert_index)}", len(self.expert_index))
            return int(key)
        return self.expert_index.setdefault(str(key), len(self.expert_index))

    def add(self, record: dict) -> None:
        entries = []
        for module, selection in record["selections"].items():
            m = self.module_index.setdefault(module, len(self.module_index))
            raw = selection.get("scores") or []
            pairs = raw.items() if isinstance(raw, dict) else enumerate(raw)
            idx, vals = [], []
            for key, value in pairs:
                idx.append(self._expert(key))
                vals.append(_score(value))
            picks = selection.get("winners", [])
            picks = [picks] if isinstance(picks, (str, int)) else picks
            entries.append((m, idx, vals, [self._expert(w) for w in picks]))
        self.steps.append(int(record["step"]))
        self.entries.append(entries)

    def finish(self) -> RoutingLog:
        shape = (len(self.steps), len(self.module_index), len(self.expert_index))
        scores = np.full(shape, np.nan)
        winners = np.zeros(shape, dtype=bool)
        for s, entries in enumerate(self.entries):
            for m, idx, vals, picks in entries:
                scores[s, m, idx] = vals
                winners[s, m, picks] = True
        experts = list(self.expert_index)
        return RoutingLog(
            steps=np.asarray(self.steps, dtype=np.int64), modules=list(self.module_index), experts=experts,
            scores=scores, winners=winners, ranks=[_rank_of(e) for e in experts], meta={"format": "reference"},
        )


def _rank_of(expert: str) -> Optional[int]:
    match = _RANK_RE.search(expert)
    return int(match.group(1)) if match else None


def _dedupe_steps(log: RoutingLog) -> RoutingLog:
    """Sort by step, keeping the last record of a step logged twice (a resumed run)."""
    if np.all(np.diff(log.steps) > 0):
        return log
    # np.unique returns sorted steps; on the reversed array its first index is the last record.
    _, first_in_reversed = np.unique(log.steps[::-1], return_index=True)
    keep = len(log.steps) - 1 - first_in_reversed
    log.steps, log.scores, log.winners = log.steps[keep], log.scores[keep], log.winners[keep]
    return log


def resolve_log_path(path: Union[str, Path]) -> Path:
    """A run directory (holding ``molf_routing.jsonl``) or the log file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no routing log at {path}: pass a run directory of a molf/molf_e run "
                                f"(it holds {LOG_FILENAME}) or the path of the log file")
    return path


def read_routing_log(path: Union[str, Path], experts: Optional[list[str]] = None) -> RoutingLog:
    """Parse a routing log (ours or the reference's) into dense arrays.

    ``experts`` names the experts of a reference-format log whose scores are lists (index order);
    without it they are called ``expert0``, ``expert1``, ...
    """
    path = resolve_log_path(path)
    parser: Union[_OursParser, _ReferenceParser, None] = None
    for number, record in _iter_records(path):
        if record.get("type") == "header":
            if parser is None:
                parser = _OursParser(record)
            continue
        if parser is None:
            if "selections" not in record:
                raise ValueError(f"{path}:{number}: neither a header line nor a reference-format step; "
                                 "is this a molf_routing.jsonl?")
            parser = _ReferenceParser(experts)
        try:
            parser.add(record)
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise ValueError(f"{path}:{number}: malformed step record ({err!r})") from err
    if parser is None:
        raise ValueError(f"{path} holds no routing records")
    return _dedupe_steps(parser.finish())


def load_routing_log(path: Union[str, Path], experts: Optional[list[str]] = None) -> pd.DataFrame:
    """Routing log as a long DataFrame (step, module, layer, module_type, expert, score, winner).

    The header fields (score_fn, topk, ...) and the expert names and ranks are in ``frame.attrs``.
    """
    return read_routing_log(path, experts).to_frame()
