"""Evaluate any saved checkpoint directory and append its row to <results_dir>/<task>.csv.

Same flags as ``python -m molf.eval``; see the README section "Benchmarks: data and evaluation". Example:

    python scripts/eval_checkpoint.py --task med --model ckpts/<run_name>/final
"""

from molf.eval.cli import main

if __name__ == "__main__":
    main()
