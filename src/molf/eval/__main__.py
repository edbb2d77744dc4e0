"""``python -m molf.eval --task {sql,med,fact} --model PATH``: evaluate a checkpoint, append its row."""

from molf.eval.cli import main

if __name__ == "__main__":
    main()
