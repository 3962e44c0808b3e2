"""Hydra sweepers that record every trial in an Optuna study (``hydra/sweeper=grid|optuna``)."""

from src.sweeper.grid import GridSweeper
from src.sweeper.optuna_sweeper import OptunaSweeper

__all__ = ["GridSweeper", "OptunaSweeper"]
