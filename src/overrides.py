"""Command-line overrides, read one way everywhere: with Hydra's own grammar (quotes, escapes, the
``+``/``++``/``~`` prefixes, sweeps), so a key or value never means one thing to the sweeper and another
to a report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException

_PREFIXES = "+~"


def parse(overrides: Iterable[str], config_loader: Any = None) -> list[Override]:
    """Hydra's parse of each override (raises Hydra's OverrideParseException on bad grammar); a sweeper
    passes its config loader, as Hydra's own sweepers do."""
    return list(OverridesParser.create(config_loader=config_loader).parse_overrides(list(overrides)))


def key(override: Override) -> str:
    """The config key an override sets, without its ``+``/``++``/``~`` prefix."""
    return bare(str(override.get_key_element()))


def bare(name: str) -> str:
    """A key as typed (``+confirm``, ``~x``) without its prefix."""
    return name.lstrip(_PREFIXES)


def values(overrides: Iterable[str]) -> dict[str, Any]:
    """key -> value of every plain (non-sweep) override, typed as Hydra reads it (later keys win)."""
    return {key(o): o.value() for o in parse(overrides) if not o.is_sweep_override() and not o.is_delete()}


def texts(overrides: Iterable[str], skip: tuple[str, ...] = ()) -> dict[str, str]:
    """key -> value as typed on the command line, for display and matching (``lora.r=8`` -> "8").
    Overrides recorded by hand that Hydra cannot parse are split at their first "="."""
    out: dict[str, str] = {}
    for text in overrides:
        if "=" not in text or text.lstrip(_PREFIXES).startswith(skip):
            continue
        try:
            (o,) = parse([text])
            name = key(o)
        except HydraException:
            name = text.split("=", 1)[0].lstrip(_PREFIXES)
        out[name] = text.split("=", 1)[1]
    return out
