"""The trial configuration a benchmark measures: composed, checked and made plain as ``src.train`` does,
so a bad override is named before any measurement starts."""

from __future__ import annotations

from typing import Any

from src.config import PROJECT_ROOT, register_configs, to_plain, validate


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides)
    validate(cfg)
    return OmegaConf.create(to_plain(cfg))  # enums as their names, as the worker reads them
