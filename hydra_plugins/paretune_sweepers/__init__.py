"""Hydra discovers plugins only inside the ``hydra_plugins`` namespace package, by class.

The sweepers' classes are what ``hydra/sweeper/{optuna,grid}.yaml`` point at (the code lives in
``src.sweeper``); the search-path plugin puts those config files (conf/ beside this file) on every
Hydra app's search path, so ``hydra/sweeper=optuna`` works in any app once this project is installed.
``reporter()`` is a job's link to its trial when the sweep prunes (src/sweeper/pruning.py).
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from src.sweeper import grid, optuna_sweeper
from src.sweeper.pruning import Reporter, reporter

__all__ = ["GridSweeper", "OptunaSweeper", "Reporter", "SweeperConfigs", "reporter"]


class GridSweeper(grid.GridSweeper):
    """Hydra's basic grid, every job recorded as an Optuna trial (see src/sweeper/grid.py)."""


class OptunaSweeper(optuna_sweeper.OptunaSweeper):
    """Optuna 5 ask/tell search (see src/sweeper/optuna_sweeper.py)."""


class SweeperConfigs(SearchPathPlugin):
    """The sweepers' config group (hydra/sweeper/optuna, grid, sampler/*, hooks/none) for every app."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="paretune-sweepers", path="pkg://hydra_plugins.paretune_sweepers.conf")
