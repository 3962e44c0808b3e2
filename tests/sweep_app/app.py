"""A cheap Hydra task for sweeper tests: writes a real result.json in milliseconds.

Run as ``python tests/sweep_app/app.py --config-dir conf -m ...`` so paretune's sweeper hooks
(conf/hydra/sweeper/hooks/paretune.yaml) are found. ``fail_above`` makes trials fail, ``sleep_s`` keeps them running.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from src.config import register_configs
from src.results import TrialResult, write

register_configs()


def check(cfg: DictConfig) -> None:
    """The sweepers' preflight for this task: what a schema would reject."""
    if not isinstance(cfg.y, int) or not isinstance(cfg.x, int | float):
        raise ValueError(f"x must be a number and y an integer, got x={cfg.x!r} y={cfg.y!r}")


@hydra.main(config_path=".", config_name="app", version_base="1.3")
def main(cfg: DictConfig) -> list[float] | None:
    out = Path(HydraConfig.get().runtime.output_dir)
    time.sleep(cfg.sleep_s)
    trial = {"id": out.name, "overrides": list(HydraConfig.get().overrides.task)}
    if cfg.fail_above is not None and cfg.x > cfg.fail_above:
        write(out, TrialResult(status="failed", trial=trial, config={},
                               error={"type": "ValueError", "message": f"x={cfg.x} is above {cfg.fail_above}"}))
        return None
    values = {"q": -((cfg.x - 0.3) ** 2) + 0.01 * cfg.y, "c": cfg.x * cfg.y}
    write(out, TrialResult(status="completed", trial=trial, config={}, metrics=values, objectives=values))
    return [values[o.name] for o in cfg.objectives]


if __name__ == "__main__":
    main()
