"""Hydra discovers sweepers only inside the ``hydra_plugins`` namespace package, by class name.

These names are what ``conf/hydra/sweeper/*.yaml`` point at; the code lives in ``src.sweeper``.
"""

from src.sweeper import grid, optuna_sweeper


class GridSweeper(grid.GridSweeper):
    """Hydra's basic grid, every job recorded as an Optuna trial (see src/sweeper/grid.py)."""


class OptunaSweeper(optuna_sweeper.OptunaSweeper):
    """Optuna 5 ask/tell search (see src/sweeper/optuna_sweeper.py)."""
