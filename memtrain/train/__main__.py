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
    from .errors import TrainingDiverged
    return ConfigError, DataError, LayoutError, ModelConfigError, CheckpointError, RunDirError, TrainingDiverged


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
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print the full resolved config at start and keep third-party warnings")
    # the DeepSpeed launcher appends --local_rank=N; the rank comes from the environment anyway
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# Third-party lines that say nothing actionable to a memtrain user (shown with -v).
QUIET_WARNINGS = ("Transformer Engine and Apex are not installed", "Setting accelerator to CPU")


def quiet_third_party() -> None:
    """Silence megatron-core's optional-dependency warnings and DeepSpeed's accelerator chatter on every rank."""
    import logging
    import warnings
    for text in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{text}.*")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda_visible() else "cpu")  # no detection warning
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def _cuda_visible() -> bool:
    import torch
    return torch.cuda.is_available()


def banner(trainer, run_dir: Path) -> str:
    """The one screen printed at start: what is trained, where, how, and what was adjusted."""
    cfg, layout = trainer.cfg, trainer.layout
    m = cfg.model
    tokens = cfg.data.batch_size * cfg.data.seq_len * layout.dp * cfg.optim.grad_accum
    engine = type(trainer.engine).__name__
    if getattr(trainer.engine, "zero_stage", 0):
        engine += f" (ZeRO {trainer.engine.zero_stage})"
    lines = [
        f"memtrain: model.memory={m.memory!r}, {m.n_layers} layers x d_model {m.d_model}, {m.num_meta_tokens} meta "
        f"tokens, {trainer.model.num_params():,} parameters on this rank",
        f"layout: {layout.world} rank(s) = dp {layout.dp} x tp {layout.tp} x pp {layout.pp} x cp {layout.cp}; "
        f"{engine}, {getattr(trainer.engine, 'precision', 'fp32')} on {trainer.device.type}",
        f"step: {tokens:,} tokens ({layout.dp * cfg.data.batch_size * cfg.optim.grad_accum} sequences x "
        f"{cfg.data.seq_len}), {cfg.schedule.steps} steps from step {trainer.step}",
        f"run directory: {run_dir} (config.toml, metrics.jsonl, tb/, checkpoints/)",
        *(f"note: {n}" for n in cfg.schedule.notes()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        quiet_third_party()
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
            if args.verbose:
                print(f"# resolved config (saved to {run_dir / 'config.toml'})")
                print(to_toml(cfg), end="")
            print(banner(trainer, run_dir), flush=True)
        summary = trainer.fit()
        if trainer.is_main and summary["first_loss"] is not None:
            last = min(10, summary["trained"])
            print(f"loss {summary['first_loss']:.4f} -> {summary['last10_loss']:.4f} (mean of the last {last} "
                  f"step{'s' if last > 1 else ''}) after {summary['steps']} steps")
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
