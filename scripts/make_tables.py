"""The paper's Table 1 (best of each sweep) and a per-run table from the results CSVs.

    python scripts/make_tables.py results/*.csv [-o DIR] [--format markdown|latex|both]
                                  [--metric med=accuracy] [--digits 2]

Prints the tables; with -o also writes DIR/table1.md, DIR/table1.tex, DIR/runs.md and DIR/runs.tex.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from molf._cli import run_cli
from molf.analysis.tables import (
    PRIMARY_METRICS,
    frame_latex,
    frame_markdown,
    load_results,
    long_table,
    table1_latex,
    table1_markdown,
    with_primary_metric,
)


def _metric_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        task, sep, column = item.partition("=")
        if not sep or not task or not column:
            raise SystemExit(f"error: --metric expects TASK=COLUMN (e.g. fact=efficacy_sequence), got {item!r}")
        if task not in PRIMARY_METRICS:
            raise SystemExit(f"error: --metric {item!r}: unknown task {task!r}; "
                             f"the tasks are {sorted(PRIMARY_METRICS)}")
        overrides[task] = column
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", help="results CSVs (results/<task>.csv)")
    parser.add_argument("-o", "--out_dir", default=None, help="also write the tables into this directory")
    parser.add_argument("--format", choices=["markdown", "latex", "both"], default="markdown",
                        help="what to print (files are written in both formats)")
    parser.add_argument("--metric", action="append", default=[],
                        help=f"primary metric of a task, TASK=COLUMN (default {PRIMARY_METRICS})")
    parser.add_argument("--digits", type=int, default=2, help="decimals of the metric values")
    args = parser.parse_args(argv)

    results = with_primary_metric(load_results(args.csv), _metric_overrides(args.metric))
    if results.empty:
        raise SystemExit("error: the results CSVs hold no row with a value of the primary metric")
    runs = long_table(results)
    outputs = {
        "table1.md": table1_markdown(results, args.digits),
        "table1.tex": table1_latex(results, args.digits),
        "runs.md": frame_markdown(runs, args.digits),
        "runs.tex": frame_latex(runs, args.digits),
    }
    if args.out_dir:  # written before anything is printed, so a closed stdout pipe cannot cut it short
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in outputs.items():
            (out_dir / name).write_text(text, encoding="utf-8")
    suffixes = {"markdown": (".md",), "latex": (".tex",), "both": (".md", ".tex")}[args.format]
    for name, text in outputs.items():
        if name.endswith(suffixes):
            print(f"## {name}\n\n{text}")
    if args.out_dir:
        print("wrote " + ", ".join(str(out_dir / name) for name in outputs))


if __name__ == "__main__":
    try:
        sys.exit(run_cli(main))
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
