"""The paper's sweeps (src/molf/sweep/grid.py): list, inspect, run locally, generate SLURM scripts.

    python scripts/sweep.py --grid molf --list [--show_done]
    python scripts/sweep.py --grid molf --index 5 --print          # the command of job 5
    python scripts/sweep.py --grid molf --index 5 --print_args     # its flags, one per line
    python scripts/sweep.py --grid molf --index 5 --is_done        # exit 0 iff its result row exists
    python scripts/sweep.py --grid fft --run --filter task=med --filter model=Qwen/Qwen2.5-1.5B [--dry_run]
    python scripts/sweep.py --grid lora --run --indices 0-3,8 --launcher torchrun --nproc 2
    python scripts/sweep.py --write_slurm                            # regenerate slurm/<grid>.sh

Grids: fft, lora, molf, molf_e, paper (the four in one array). Jobs whose run_name already has a row
in RESULTS_DIR/<task>.csv are skipped (--no_skip to rerun). Flags after `--` go to train.py as is.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from molf._cli import run_cli
from molf.sweep.grid import GRID_NAMES, Job, grid_jobs
from molf.sweep.runner import (
    RunPaths,
    filter_jobs,
    is_done,
    launch_command,
    parse_indices,
    run_jobs,
    train_args,
)
from molf.sweep.slurm import write_slurm_scripts

REPO_ROOT = Path(__file__).resolve().parents[1]
LIST_KEYS = ["dataset_type", "model_name_or_path", "mode", "learning_rate", "lora_learning_rate",
             "lr_scheduler_type"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=GRID_NAMES, default="paper")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="list the grid's jobs")
    action.add_argument("--print", action="store_true", help="print the config and command of --index")
    action.add_argument("--print_args", action="store_true", help="print the train.py flags of --index, one a line")
    action.add_argument("--is_done", action="store_true", help="exit 0 if --index has a result row, else 1")
    action.add_argument("--run", action="store_true", help="run the selected jobs locally, one after another")
    action.add_argument("--write_slurm", action="store_true", help="regenerate slurm/<grid>.sh from the template")
    parser.add_argument("--index", type=int, help="array index of one job")
    parser.add_argument("--indices", help="select jobs by index, e.g. 0-3,8")
    parser.add_argument("--filter", action="append", default=[],
                        help="select jobs by flag, KEY=VALUE (model, task, lr, lora_lr, scheduler or any flag)")
    parser.add_argument("--show_done", action="store_true", help="--list: mark jobs with a result row")
    parser.add_argument("--dry_run", action="store_true", help="--run: print the commands only")
    parser.add_argument("--no_skip", action="store_true", help="--run: also run jobs with a result row")
    parser.add_argument("--keep_going", action="store_true", help="--run: continue after a failed job")
    parser.add_argument("--launcher", choices=["python", "torchrun"], default="python")
    parser.add_argument("--nproc", type=int, default=1, help="GPUs per job with --launcher torchrun")
    parser.add_argument("--ckpt_dir_root", default="ckpts")
    parser.add_argument("--log_dir_root", default="logs")
    parser.add_argument("--results_dir", default="results")
    return parser


def _select(args: argparse.Namespace, jobs: list[Job]) -> list[Job]:
    if args.index is not None:
        if args.indices or args.filter:
            raise ValueError("--index names one job by its array index: drop --indices / --filter, "
                             "or select with those instead of --index")
        return [jobs[i] for i in parse_indices(str(args.index), len(jobs))]
    if args.indices:
        jobs = [jobs[i] for i in parse_indices(args.indices, len(jobs))]
    return filter_jobs(jobs, args.filter)


def _list(jobs: list[Job], paths: RunPaths, extra: list[str], show_done: bool, world_size: int) -> None:
    for job in jobs:
        fields = "  ".join(f"{job.flags[k]}" for k in LIST_KEYS if k in job.flags)
        done = ("done  " if is_done(job, paths, extra, world_size) else "todo  ") if show_done else ""
        print(f"{job.index:4d}  {done}{fields}")
    print(f"{len(jobs)} jobs")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = _parser().parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    if args.write_slurm:
        for path in write_slurm_scripts(REPO_ROOT / "slurm"):
            print(f"wrote {path}")
        return 0
    if (args.print or args.print_args or args.is_done) and args.index is None:
        print("error: --print, --print_args and --is_done need --index I", file=sys.stderr)
        return 2
    # Absolute, from where the sweep was started: jobs run in the repository root, and the finished-job
    # check must read the results CSV the jobs append to.
    folders = (args.ckpt_dir_root, args.log_dir_root, args.results_dir)
    paths = RunPaths(*(str(Path(folder).expanduser().resolve()) for folder in folders))
    try:
        jobs = _select(args, grid_jobs(args.grid))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    world_size = args.nproc if args.launcher == "torchrun" else 1  # a DDP run's name says how many processes
    if args.list:
        _list(jobs, paths, extra, args.show_done, world_size)
    elif args.print:
        job = jobs[0]
        print(f"{job.grid} #{job.index}: " + " ".join(f"{k}={v}" for k, v in job.flags.items()))
        print(shlex.join(launch_command(train_args(job, paths, extra), args.launcher, args.nproc)))
    elif args.print_args:
        print("\n".join(train_args(jobs[0], paths, extra)))
    elif args.is_done:
        return 0 if is_done(jobs[0], paths, extra, world_size) else 1
    else:
        outcome = run_jobs(jobs, paths, extra, args.launcher, args.nproc, dry_run=args.dry_run,
                           skip_done=not args.no_skip, keep_going=args.keep_going, cwd=str(REPO_ROOT))
        print(f"ran {len(outcome['ran'])}, skipped {len(outcome['skipped'])}, failed {outcome['failed'] or 'none'}")
        return 1 if outcome["failed"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
