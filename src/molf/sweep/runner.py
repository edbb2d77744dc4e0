"""Select grid jobs, tell which are done, and run them locally one after another.

A job is done when ``results/<task>.csv`` holds a complete row (its primary metric a number) whose
``run_name`` is the job's ``TrainingConfig.run_name`` and whose ``num_eval_samples`` is the job's,
so an interrupted sweep resumes by running the same command again.
"""

from __future__ import annotations

import csv
import math
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from molf.sweep.grid import Job, format_flag_value

TRAIN_SCRIPT = "src/script/train.py"
# Short names accepted by --filter.
FILTER_ALIASES = {"model": "model_name_or_path", "task": "dataset_type", "lr": "learning_rate",
                  "lora_lr": "lora_learning_rate", "scheduler": "lr_scheduler_type"}


@dataclass(frozen=True)
class RunPaths:
    """Where jobs write: checkpoints/run directories, logs, and the results CSVs."""

    ckpt_dir_root: str = "ckpts"
    log_dir_root: str = "logs"
    results_dir: str = "results"

    def args(self) -> list[str]:
        # auto: a job cut off by a time limit continues from its last checkpoint when run again.
        return ["--ckpt_dir_root", self.ckpt_dir_root, "--log_dir_root", self.log_dir_root,
                "--results_dir", self.results_dir, "--resume_from_checkpoint", "auto"]


def parse_indices(spec: str, num_jobs: int) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``; every index must be in ``[0, num_jobs)``."""
    indices: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        low, sep, high = part.partition("-")
        try:
            span = range(int(low), int(high) + 1) if sep else [int(low)]
        except ValueError:
            raise ValueError(f"bad index range {part!r}: use e.g. 0-3,7") from None
        if not span:
            raise ValueError(f"index range {part!r} is empty: write the lower index first, e.g. {high}-{low}")
        indices += list(span)
    bad = [i for i in indices if not 0 <= i < num_jobs]
    if bad:
        raise ValueError(f"indices {bad} are outside the grid (0..{num_jobs - 1})")
    return list(dict.fromkeys(indices))


def _matches(value: Any, wanted: str) -> bool:
    if format_flag_value(value) == wanted or str(value) == wanted:
        return True
    if isinstance(value, bool):
        return wanted.lower() == str(value).lower()
    try:
        return isinstance(value, (int, float)) and float(wanted) == float(value)
    except ValueError:
        return False


def filter_jobs(jobs: Sequence[Job], filters: Sequence[str]) -> list[Job]:
    """Keep jobs matching every ``KEY=VALUE`` (KEY a flag or alias: model, task, lr, lora_lr, scheduler)."""
    selected = list(jobs)
    for item in filters:
        key, sep, wanted = item.partition("=")
        if not sep:
            raise ValueError(f"--filter expects KEY=VALUE (e.g. task=med), got {item!r}")
        key = FILTER_ALIASES.get(key, key)
        if jobs and all(key not in job.flags for job in jobs):
            raise ValueError(f"no job of this grid has the flag {key!r}; flags: {sorted(jobs[0].flags)}")
        before = selected
        selected = [job for job in selected if key in job.flags and _matches(job.flags[key], wanted)]
        if before and not selected:
            values = sorted({format_flag_value(job.flags[key]) for job in before if key in job.flags})
            raise ValueError(f"--filter {item} matches no job (after the filters before it); {key} takes {values}")
    return selected


def train_args(job: Job, paths: RunPaths, extra: Sequence[str] = ()) -> list[str]:
    """All flags of ``src/script/train.py`` for ``job``: grid flags, paths, then ``extra`` (which win)."""
    return job.args() + paths.args() + list(extra)


def job_config(job: Job, paths: RunPaths, extra: Sequence[str] = ()):
    """The job's parsed ``molf.config.TrainingConfig`` (raises if a flag is invalid)."""
    import draccus

    from molf.config import TrainingConfig

    return draccus.parse(TrainingConfig, args=train_args(job, paths, extra))


def completed_run_names(results_dir: str, task: str, num_eval_samples: Optional[int] = None) -> set[str]:
    """Run names with a complete row in ``results_dir/<task>.csv`` evaluated with the cap
    ``num_eval_samples`` (None: on everything); empty when the file does not exist yet.

    A row counts when its task's primary metric is a number: a row cut short by a killed writer,
    or one without the metric, leaves its job to run again.
    """
    from molf.eval.results import TASK_METRICS, read_lines

    path = Path(results_dir) / f"{task}.csv"
    if not path.is_file():
        return set()
    primary, cap = TASK_METRICS[task][0], "" if num_eval_samples is None else str(num_eval_samples)
    header, rows, _ = read_lines(path)  # line by line: a row cut inside a quoted field hides no other row
    done = set()
    for row in csv.DictReader((line for _, line in rows), fieldnames=header):
        if row.get("run_name") and _is_number(row.get(primary)) and (row.get("num_eval_samples") or "") == cap:
            done.add(row["run_name"])
    return done


def _is_number(text: Optional[str]) -> bool:
    try:
        return math.isfinite(float(text))
    except (TypeError, ValueError):
        return False


def is_done(job: Job, paths: RunPaths, extra: Sequence[str] = (), world_size: int = 1) -> bool:
    """Whether the job, trained by ``world_size`` processes (its run name says how many), has its row."""
    cfg = job_config(job, paths, extra)
    return cfg.run_name_for(world_size) in completed_run_names(paths.results_dir, job.task, cfg.num_eval_samples)


def free_port() -> int:
    """A TCP port free right now, for ``torchrun --master_port`` (jobs sharing a node must not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(args: Sequence[str], launcher: str = "python", nproc: int = 1,
                   port: Optional[int] = None) -> list[str]:
    """``python src/script/train.py ARGS`` or ``torchrun --nproc_per_node N --master_port P ... ARGS``."""
    if launcher == "python":
        return [sys.executable, TRAIN_SCRIPT, *args]
    if launcher == "torchrun":
        port = free_port() if port is None else port
        return ["torchrun", "--nnodes", "1", f"--nproc_per_node={nproc}", f"--master_port={port}",
                TRAIN_SCRIPT, *args]
    raise ValueError(f"launcher must be 'python' or 'torchrun', got {launcher!r}")


def run_jobs(jobs: Sequence[Job], paths: RunPaths, extra: Sequence[str] = (), launcher: str = "python",
             nproc: int = 1, dry_run: bool = False, skip_done: bool = True, keep_going: bool = False,
             cwd: Optional[str] = None) -> dict[str, list[int]]:
    """Run ``jobs`` one after another; returns the indices that ran, were skipped, and failed.

    ``dry_run`` prints each command instead of running it. A failure stops the sweep unless
    ``keep_going``.
    """
    outcome: dict[str, list[int]] = {"ran": [], "skipped": [], "failed": []}
    world_size = nproc if launcher == "torchrun" else 1
    for position, job in enumerate(jobs, start=1):
        head = f"[{position}/{len(jobs)}] {job.grid} #{job.index}"
        if skip_done and is_done(job, paths, extra, world_size):
            print(f"{head}: result row exists, skipping", flush=True)
            outcome["skipped"].append(job.index)
            continue
        command = launch_command(train_args(job, paths, extra), launcher, nproc)
        print(f"{head}: {shlex.join(command)}", flush=True)
        if dry_run:
            continue
        if subprocess.run(command, cwd=cwd).returncode == 0:
            outcome["ran"].append(job.index)
            continue
        outcome["failed"].append(job.index)
        if not keep_going:
            break
    return outcome
