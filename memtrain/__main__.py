"""`python -m memtrain COMMAND ...`, the same as the `memtrain` console script (memtrain/cli.py)."""
import sys

from memtrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
