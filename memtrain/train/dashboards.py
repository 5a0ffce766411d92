"""Where the scalars of a run go (rank 0): tensorboard always, Weights & Biases when `logging.wandb` is on.

Both get the same tags (`train/loss`, `train/lr`, `eval/loss`, `memory/layer0/theta_mean`, ...) at the same
steps. W&B runs offline when `logging.wandb_mode = "offline"` (files under RUN_DIR/wandb, `wandb sync` uploads
them later) and resumes the same W&B run when the training run resumes (its id is kept in RUN_DIR/wandb_id).
"""
from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path


def check_wandb(enabled: bool) -> None:
    """One line before anything is built when W&B is asked for but not installed."""
    if not enabled:
        return
    import importlib.util
    if importlib.util.find_spec("wandb") is None:
        from .configtree import ConfigError
        raise ConfigError("logging.wandb = true needs the wandb package: pip install 'memtrain[wandb]' (or set "
                          "logging.wandb = false)")


class Dashboards:
    """tensorboard (+ W&B) writers of one run; `log(step, scalars)` writes one point per tag."""

    def __init__(self, run_dir: Path, cfg, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: events of steps after the resumed one (logged before a crash) are dropped
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        self.wandb = None
        if cfg.logging.wandb:
            import wandb
            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() and resume_step else secrets.token_hex(6)
            id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=run_dir.name, id=run_id, dir=str(run_dir),
                                    mode=cfg.logging.wandb_mode, resume="allow", config=dataclasses.asdict(cfg))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        tagged = {tag if "/" in tag else f"train/{tag}": value for tag, value in scalars.items()}
        for tag, value in tagged.items():
            self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(tagged, step=step)

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
