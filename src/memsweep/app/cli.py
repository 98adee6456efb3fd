"""Checks on the command line that must happen before Hydra composes anything.

A group choice that does not exist (`model=nosuch`) or a misspelt key (`model.hiden=3`, `sq=5`)
fails Hydra's composition with a multi-line message, and in a multirun a bad choice kills the
sweep half-way. Checking overrides first turns each into one line that lists what is allowed,
before any job runs. Values themselves are checked per job (a bad value becomes an error row).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf

from memsweep.errors import ConfigError

GROUPS = ("model", "workload", "optimizer", "hardware", "parallel", "measure", "formula")


def presets(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


@cache
def group_keys(conf_dir: Path, group: str) -> tuple[str, ...]:
    keys: set[str] = set()
    for path in (conf_dir / group).glob("*.yaml"):
        keys.update(OmegaConf.load(path).keys())
    return tuple(sorted(keys))


@cache
def top_keys(conf_dir: Path) -> tuple[str, ...]:
    root = OmegaConf.load(conf_dir / "config.yaml")
    return tuple(k for k in root.keys() if k not in ("defaults", "hydra"))


def override_value(o: Override) -> str:
    """The value of an override as the user typed it (sweeps included)."""
    try:
        return o.get_value_element_as_str()
    except Exception:
        return o.input_line.split("=", 1)[-1]


def parse_overrides(argv: list[str]) -> list[Override]:
    """Hydra's own parse of the command line; [] if it cannot parse (Hydra will say why)."""
    args = [a for a in argv if not a.startswith("-")]
    try:
        return OverridesParser.create().parse_overrides(args)
    except Exception:  # not ours to report: Hydra will, with its own message
        return []


def check_overrides(argv: list[str], conf_dir: Path) -> None:
    """Raise `ConfigError` for an unknown preset or key in the command-line overrides."""
    for o in parse_overrides(argv):
        key = o.key_or_group
        # `+key=`/`++key=`/`~key` say "I know this key is new or going"; hydra/* is Hydra's own.
        if o.is_add() or o.is_force_add() or o.is_delete() or o.package is not None:
            continue
        if key.startswith("hydra") or "/" in key:
            continue
        group, _, rest = key.partition(".")
        if group not in GROUPS:
            if key not in top_keys(conf_dir):
                allowed = [*top_keys(conf_dir), *GROUPS]
                raise ConfigError(key, override_value(o), f"top-level keys: {', '.join(allowed)}")
        elif rest:
            if rest.split(".")[0] not in group_keys(conf_dir, group):
                raise ConfigError(key, override_value(o), f"keys of {group}: {', '.join(group_keys(conf_dir, group))}")
        else:
            try:
                values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [override_value(o)]
            except Exception:  # glob() and other sweeps resolved by Hydra itself
                continue
            allowed_presets = presets(conf_dir, group)
            for value in values:
                if value not in allowed_presets:
                    raise ConfigError(group, value, allowed_presets)
