"""The checked-in SLURM scripts: up to date, valid bash, and they submit / run the right job."""

from __future__ import annotations

import csv
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from molf.eval.results import TASK_METRICS
from molf.sweep.grid import GRID_NAMES, grid_jobs
from molf.sweep.runner import RunPaths, job_config
from molf.sweep.slurm import render_slurm_script

REPO_ROOT = Path(__file__).resolve().parents[2]
SLURM = REPO_ROOT / "slurm"
TEMPLATE = (SLURM / "array.sh.template").read_text()


@pytest.mark.parametrize("grid", GRID_NAMES)
def test_checked_in_script_is_current_and_valid_bash(grid):
    path = SLURM / f"{grid}.sh"
    assert path.read_text() == render_slurm_script(grid, TEMPLATE), \
        "slurm/ is stale: run python scripts/sweep.py --write_slurm"
    assert f"NUM_JOBS={len(grid_jobs(grid))}\n" in path.read_text()
    assert os.stat(path).st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_unknown_placeholder_is_refused():
    with pytest.raises(ValueError, match="@CLUSTER@"):
        render_slurm_script("fft", TEMPLATE + "\n# @CLUSTER@\n")


def _fake_bin(tmp_path: Path, name: str) -> Path:
    """An executable ``name`` that records its arguments, one per line, in ``tmp_path/name.args``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{tmp_path / (name + ".args")}"\n')
    tool.chmod(0o755)
    return bin_dir


def _env(tmp_path: Path, bin_dir: Path, **extra: str) -> dict[str, str]:
    python_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{python_dir}:{env.get('PATH', '')}", REPO_DIR=str(REPO_ROOT),
               CKPT_ROOT=str(tmp_path / "ckpts"), LOG_ROOT=str(tmp_path / "logs"),
               RESULTS_DIR=str(tmp_path / "results"), **extra)
    return env


def test_submit_mode_calls_sbatch(tmp_path):
    bin_dir = _fake_bin(tmp_path, "sbatch")
    env = _env(tmp_path, bin_dir, GPU_TYPE="h100", NUM_GPUS="2", ACCOUNT="proj42", MAX_PARALLEL="4")
    subprocess.run(["bash", str(SLURM / "fft.sh")], env=env, check=True, cwd=tmp_path)
    args = (tmp_path / "sbatch.args").read_text().splitlines()
    option = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert option["--array"] == "0-53%4"
    assert option["--gres"] == "gpu:h100:2" and option["--cpus-per-task"] == "16"
    assert option["--account"] == "proj42" and "--qos" not in option
    assert args[-1].endswith("slurm/fft.sh")
    subprocess.run(["bash", str(SLURM / "fft.sh")], env={**env, "ARRAY": "0-9%2"}, check=True, cwd=tmp_path)
    args = (tmp_path / "sbatch.args").read_text().splitlines()
    assert args[args.index("--array") + 1] == "0-9%2"  # its own limit, not 0-9%2%4


def test_job_mode_runs_torchrun_with_the_index_config(tmp_path):
    bin_dir = _fake_bin(tmp_path, "torchrun")
    env = _env(tmp_path, bin_dir, SLURM_ARRAY_TASK_ID="7", NUM_GPUS="1")
    result = subprocess.run(["bash", str(SLURM / "molf_e.sh")], env=env, capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job = grid_jobs("molf_e")[7]
    assert "molf_e #7: " in result.stdout
    args = (tmp_path / "torchrun.args").read_text().splitlines()
    assert args[:3] == ["--nnodes", "1", "--nproc_per_node=1"]
    assert args[3].startswith("--master_port=")
    port = int(args[3].split("=", 1)[1])
    assert 0 < port < 65536
    # The job prints the command it runs: torchrun with the job's port, not a python stand-in.
    assert f"torchrun --nnodes 1 --nproc_per_node=1 --master_port={port} src/script/train.py" in result.stdout
    train = args[args.index("src/script/train.py") + 1:]
    assert train[: len(job.args())] == job.args()
    assert train[train.index("--results_dir") + 1] == str(tmp_path / "results")


def test_job_mode_skips_a_finished_run_from_a_spool_copy(tmp_path):
    bin_dir = _fake_bin(tmp_path, "torchrun")
    job = grid_jobs("lora")[2]
    paths = RunPaths(str(tmp_path / "ckpts"), str(tmp_path / "logs"), str(tmp_path / "results"))
    (tmp_path / "results").mkdir()
    with (tmp_path / "results" / f"{job.task}.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["run_name", TASK_METRICS[job.task][0]], [job_config(job, paths).run_name, 0.5]])
    # As after a plain `sbatch --array`: SLURM runs a copy from its spool directory, REPO_DIR unset.
    spool_copy = tmp_path / "spool" / "slurm_script"
    spool_copy.parent.mkdir()
    spool_copy.write_text((SLURM / "lora.sh").read_text())
    env = _env(tmp_path, bin_dir, SLURM_ARRAY_TASK_ID="2", SLURM_SUBMIT_DIR=str(REPO_ROOT))
    del env["REPO_DIR"]
    result = subprocess.run(["bash", str(spool_copy)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "result row exists, skipping" in result.stdout
    assert not (tmp_path / "torchrun.args").exists()


def test_spool_copy_without_settings_writes_under_the_submission_directory(tmp_path):
    bin_dir = _fake_bin(tmp_path, "torchrun")
    spool_copy = tmp_path / "spool" / "slurm_script"
    spool_copy.parent.mkdir()
    spool_copy.write_text((SLURM / "molf.sh").read_text())
    env = _env(tmp_path, bin_dir, SLURM_ARRAY_TASK_ID="0", SLURM_SUBMIT_DIR=str(REPO_ROOT))
    for name in ("REPO_DIR", "CKPT_ROOT", "LOG_ROOT", "RESULTS_DIR"):
        del env[name]
    result = subprocess.run(["bash", str(spool_copy)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    train = (tmp_path / "torchrun.args").read_text().splitlines()
    for flag, folder in (("--ckpt_dir_root", "ckpts"), ("--log_dir_root", "logs"), ("--results_dir", "results")):
        assert train[train.index(flag) + 1] == str(REPO_ROOT / folder)
