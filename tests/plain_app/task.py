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


@hydra.main(config_path="conf", config_name="curve", version_base="1.3")
def curve(cfg: DictConfig) -> float | tuple[float, float]:
    """A loss that falls with the steps, higher for larger |x|, reported at every step the pruner reads:
    it stops the trials whose curve is worse than the earlier trials' at the same step."""
    from optuna import TrialPruned

    from hydra_plugins.paretune_sweepers import reporter

    report = reporter()  # None when the sweep does not prune
    loss = 0.0
    for step in range(cfg.steps):
        loss = (float(cfg.x) ** 2 + 1) * (1 + 1 / (step + 1))
        if report is not None and report.due(step) and report.report(step, loss):
            raise TrialPruned(f"pruned at step {step}")
    return loss if cfg.objectives == 1 else (loss, abs(float(cfg.x)))


def near_x(cfg: DictConfig, trial: object) -> None:
    """custom_search_space: z is searched within cfg.max_z_from_x of the x this trial drew."""
    x = trial.params["x"]  # type: ignore[attr-defined]
    trial.suggest_float("z", x - cfg.max_z_from_x, x + cfg.max_z_from_x)  # type: ignore[attr-defined]


if __name__ == "__main__":
    import sys

    # python task.py [binh_korn | curve] [overrides...]
    if len(sys.argv) > 1 and sys.argv[1] in ("binh_korn", "curve"):
        app = binh_korn if sys.argv.pop(1) == "binh_korn" else curve
        app()
    else:
        sphere()
