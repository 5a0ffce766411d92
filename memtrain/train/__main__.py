"""`python -m memtrain.train --config configs/X.toml [--set a.b=value ...] [--run-dir DIR] [--resume auto]`.

Exit codes: 0 done; 2 a user error (missing config file, key typos, impossible layouts, bad data, a run
directory in use): one line on stderr, never a traceback; 75 (EX_TEMPFAIL) stopped by SIGTERM / SIGINT after
saving a checkpoint at the end of the step, resume with `--resume auto`; 1 another rank was lost.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .configtree import ConfigError

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal with a checkpoint saved; resume to continue


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the user asked for something impossible' rather than a bug."""
    from memtrain.data.errors import DataError
    from memtrain.launch.config import LayoutError
    from memtrain.model.errors import ModelConfigError

    from .checkpoint import CheckpointError
    from .rundir import RunDirError
    return ConfigError, DataError, LayoutError, ModelConfigError, CheckpointError, RunDirError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m memtrain.train", description="Train a memtrain model.")
    p.add_argument("--config", help="TOML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set model.n_layers=4 (repeatable)")
    p.add_argument("--run-dir", help="where logs and checkpoints go (default runs/<config>-<time>)")
    p.add_argument("--resume", default="none", help="none, auto (newest complete checkpoint) or a path")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --run-dir that holds an earlier run (its checkpoints and logs are deleted)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # the DeepSpeed launcher appends --local_rank=N; the rank comes from the environment anyway
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from .config import load_config
        from .configtree import to_toml
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_toml(cfg), end="")
            return 0
        if args.resume == "auto" and not args.run_dir:
            raise ConfigError("--resume auto continues the run in --run-dir DIR: name the run directory")
        name = Path(args.config).stem if args.config else "default"
        default_run_dir = f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"  # rank 0's choice is broadcast
        from .trainer import Trainer
        if args.overwrite and args.resume != "none":
            raise ConfigError("--overwrite starts afresh and --resume continues: give one of them")
        trainer = Trainer(cfg, args.run_dir, resume=args.resume, overwrite=args.overwrite,
                          default_run_dir=default_run_dir)
        run_dir = trainer.run_dir
        if trainer.is_main:
            print(f"# resolved config (saved to {run_dir / 'config.toml'})")
            print(to_toml(cfg), end="", flush=True)
            print(f"# model: {trainer.model.num_params():,} parameters on this rank; "
                  f"layout: dp={trainer.layout.dp} tp={trainer.layout.tp} pp={trainer.layout.pp} "
                  f"cp={trainer.layout.cp}", flush=True)
        summary = trainer.fit()
        if trainer.is_main and summary["first_loss"] is not None:
            print(f"loss {summary['first_loss']:.4f} -> {summary['last10_loss']:.4f} (mean of the last 10 steps) "
                  f"after {summary['steps']} steps")
        elif trainer.is_main:
            print(f"nothing to train: the run is already at step {summary['steps']} of {cfg.schedule.steps}")
        if trainer.is_main:
            print(f"tensorboard logs: {summary['tensorboard']}")
            print(f"checkpoint:       {summary['checkpoint']}")
        if summary["interrupted"]:
            if trainer.is_main:
                print(f"stopped at step {summary['steps']} of {cfg.schedule.steps} by a signal; checkpoint "
                      f"{summary['checkpoint']}; continue with --run-dir {run_dir} --resume auto",
                      file=sys.stderr, flush=True)
            return EXIT_STOPPED
    except user_errors() as e:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        where = f" (rank {os.environ.get('RANK', '0')})" if world > 1 else ""
        print(f"error{where}: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from memtrain.launch.groups import is_lost_peer
        if not is_lost_peer(e):
            raise
        # Another rank died (or hung past parallel.timeout_s): the collective failed on this one.
        first = str(e).strip().splitlines()[0][:200]
        print(f"error (rank {os.environ.get('RANK', '0')}): lost contact with another rank, which crashed, was "
              f"killed or hung ({first}); the job stops. Checkpoints already written are complete: restart "
              f"with --run-dir DIR --resume auto", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
