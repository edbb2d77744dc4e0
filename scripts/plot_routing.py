"""Routing-dynamics figures and a text summary from a MoLF run's ``molf_routing.jsonl``.

    python scripts/plot_routing.py RUN_DIR [-o DIR] [--tail_fraction 0.1]

RUN_DIR is a run directory or the log file itself (ours or the reference's format). Figures go to
DIR (default: RUN_DIR/figures); the summary is printed and written to DIR/routing_summary.txt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from molf._cli import run_cli
from molf.analysis.routing_log import read_routing_log, resolve_log_path
from molf.analysis.routing_plots import plot_routing
from molf.analysis.routing_stats import format_summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory holding molf_routing.jsonl, or the log file")
    parser.add_argument("-o", "--out_dir", default=None, help="output directory (default: RUN_DIR/figures)")
    parser.add_argument("--tail_fraction", type=float, default=0.1,
                        help="summary: share over this last fraction of logged steps (default 0.1)")
    parser.add_argument("--experts", default=None,
                        help="comma-separated expert names for a reference log whose scores are lists")
    args = parser.parse_args(argv)

    log_path = resolve_log_path(args.run)
    out_dir = Path(args.out_dir) if args.out_dir else log_path.parent / "figures"
    log = read_routing_log(log_path, experts=args.experts.split(",") if args.experts else None)
    paths = plot_routing(log, out_dir)
    summary = format_summary(log, args.tail_fraction)
    (out_dir / "routing_summary.txt").write_text(summary + "\n", encoding="utf-8")
    print(summary)
    print("\nwrote " + ", ".join(str(p) for p in paths + [out_dir / "routing_summary.txt"]))


if __name__ == "__main__":
    try:
        sys.exit(run_cli(main))
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
