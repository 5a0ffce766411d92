"""The `memtrain` command: one entry point for what users run, each subcommand a `python -m` module.

    memtrain train --config configs/demo.toml          = python -m memtrain.train ...
    memtrain prepare --source stdlib --out DIR         = python -m memtrain.data.prepare ...
    memtrain plan --config X --world 64 --gpu-mem 80   = python -m memtrain.train.plan ...
    memtrain launch --nproc 2 -- --config ...          = memtrain/launch/run.sh ...

A subcommand runs its module exactly as `python -m` would (same arguments, exit codes and one-line errors), so
the two spellings can never drift apart; the launcher scripts keep using the module form.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

# subcommand -> (module run as __main__, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("memtrain.train", "train a model (one process, or every rank under a launcher)"),
    "prepare": ("memtrain.data.prepare", "text -> sentencepiece tokenizer -> token shards + manifest"),
    "verify": ("memtrain.data.verify", "check a prepared dataset's shards against its manifest"),
    "tasks": ("memtrain.data.tasks", "write the offline long-context task sets"),
    "export-hf": ("memtrain.train.export_hf", "a checkpoint to a Hugging Face model directory"),
    "import-hf": ("memtrain.train.import_hf", "a Hugging Face export back to a memtrain checkpoint"),
    "inspect": ("memtrain.train.inspect", "registers, attention maps and memory gates of a checkpoint"),
    "experiment": ("memtrain.train.experiment", "experiments that train and compare several variants"),
    "plan": ("memtrain.train.plan", "per-rank memory of a parallel layout, before launching it (docs/planner.md)"),
}
LAUNCHER = Path(__file__).resolve().parent / "launch" / "run.sh"


def _usage() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = ["usage: memtrain COMMAND [ARGS ...]   (memtrain COMMAND --help for its arguments)", "", "commands:"]
    lines += [f"  {name:<{width}}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append(f"  {'launch':<{width}}the DeepSpeed launcher around `memtrain train` (memtrain/launch/run.sh)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from memtrain import __version__
        print(f"memtrain {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "launch":
        # The launcher is a shell script (DeepSpeed's runner, ssh/pdsh, SLURM); it starts ranks with this Python.
        env = dict(os.environ)
        env.setdefault("PYTHON", sys.executable)
        os.execve("/bin/bash", ["bash", str(LAUNCHER), *rest], env)
    if command not in COMMANDS:
        print(f"memtrain: unknown command '{command}'; choose one of: {', '.join([*COMMANDS, 'launch'])}",
              file=sys.stderr)
        return 2
    module = COMMANDS[command][0]
    sys.argv = [f"memtrain {command}", *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)  # a module's __main__ exits with its own code
    return 0
