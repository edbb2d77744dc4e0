"""``python -m molf.eval --task {sql,med,fact} --model PATH``: evaluate a checkpoint, append its row."""

import sys

from molf.eval.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
