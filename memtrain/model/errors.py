"""Errors the model raises for bad configuration or bad input (clear one-line messages)."""


class ModelConfigError(ValueError):
    """A model config value is invalid; the message names the key (`model.x`) and what is allowed."""
