"""A Hydra app that knows nothing of paretune: the sweeper tests use it as a user's own app would.

It selects ``hydra/sweeper: optuna`` (or ``grid``) with the keys of Hydra's official Optuna sweeper
and returns its objective(s) from the task function. ``fail_when_x_above`` raises in the job.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="sphere", version_base="1.3")
def sphere(cfg: DictConfig) -> float:
    if cfg.fail_when_x_above is not None and cfg.x > cfg.fail_when_x_above:
        raise RuntimeError(f"x={cfg.x} is above {cfg.fail_when_x_above}")
    return float(cfg.x) ** 2 + float(cfg.y) ** 2 + 0.001 * cfg.seed


@hydra.main(config_path="conf", config_name="binh_korn", version_base="1.3")
def binh_korn(cfg: DictConfig) -> tuple[float, float]:
    """Two objectives to minimise whose trade-off is a known curve (Binh and Korn, 1997)."""
    x, y = float(cfg.x), float(cfg.y)
    return 4 * x ** 2 + 4 * y ** 2, (x - 5) ** 2 + (y - 5) ** 2


def near_x(cfg: DictConfig, trial: object) -> None:
    """custom_search_space: z is searched within cfg.max_z_from_x of the x this trial drew."""
    x = trial.params["x"]  # type: ignore[attr-defined]
    trial.suggest_float("z", x - cfg.max_z_from_x, x + cfg.max_z_from_x)  # type: ignore[attr-defined]


if __name__ == "__main__":
    import sys

    # python task.py [binh_korn] [overrides...]
    if len(sys.argv) > 1 and sys.argv[1] == "binh_korn":
        sys.argv.pop(1)
        binh_korn()
    else:
        sphere()
