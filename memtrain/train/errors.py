"""Errors of a training run that are the user's to act on, light to import (the command lines catch them before
the trainer and its heavy dependencies are loaded)."""
from __future__ import annotations


class TrainingDiverged(FloatingPointError):
    """The training loss stopped being finite: the run stops with a one-line error (what to try, which checkpoint
    is intact) instead of training on NaN."""
