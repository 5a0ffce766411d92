"""`python -m memtrain.train.experiment {long_context,lm_quality} --config configs/experiments/NAME.toml
[--run-dir DIR] [--out DIR] [--set key=value ...]`.

User errors (missing or malformed config, unknown keys or variants, impossible lengths, a run directory made by
another experiment) print one line `error: ...` on stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m memtrain.train.experiment", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="experiment", required=True)
    lc = sub.add_parser("long_context", help="memory variants vs the sliding-window baseline at up to 64x length")
    lc.add_argument("--config", required=True, help="experiment preset, e.g. configs/experiments/long_context.toml")
    lc.add_argument("--run-dir", default="runs/long_context", help="checkpoints, results.csv, tables and plots "
                    "(rerunning resumes: finished cells are not recomputed)")
    lc.add_argument("--out", help="also copy results.csv, results.md and the plots here")
    lc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config value, e.g. --set train.steps=100 (repeatable)")
    lc.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    lm = sub.add_parser("lm_quality", help="every variant trained on the same tokens: held-out perplexity by length "
                        "and position")
    lm.add_argument("--config", required=True, help="experiment preset, e.g. configs/experiments/lm_quality.toml")
    lm.add_argument("--run-dir", default="runs/lm_quality", help="the variants' runs, results.csv, results.md and "
                    "plots (rerunning resumes: trained variants and finished cells are reused)")
    lm.add_argument("--out", help="also copy results.csv, results.md and the plots here")
    lm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one preset value, e.g. --set experiment.tokens=200000 or "
                         "--set train.data.batch_size=4 (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from memtrain.train.__main__ import user_errors
    try:
        if args.experiment == "lm_quality":
            from .lm_quality import main_lm_quality
            return main_lm_quality(args)
        if args.print_config:
            from memtrain.train.configtree import to_toml
            from .config import load_experiment_config
            print(to_toml(load_experiment_config(args.config, args.overrides)), end="")
            return 0
        from .long_context import main_long_context
        return main_long_context(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
