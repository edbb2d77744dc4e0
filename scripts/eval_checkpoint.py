"""Evaluate any saved checkpoint directory and append its row to <results_dir>/<task>.csv.

Same flags as ``python -m molf.eval``; see the README section "Benchmarks: data and evaluation". Example:

    python scripts/eval_checkpoint.py --task med --model ckpts/<run_name>/final
"""

import sys

from molf.eval.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
