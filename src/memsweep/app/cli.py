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
def preset_keys(conf_dir: Path, group: str, name: str) -> tuple[str, ...]:
    path = conf_dir / group / f"{name}.yaml"
    return tuple(OmegaConf.load(path).keys()) if path.is_file() else ()


@cache
def default_choices(conf_dir: Path) -> dict[str, str]:
    """The group options config.yaml's defaults list selects."""
    choices = {}
    for item in OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml")).get("defaults", []):
        if isinstance(item, dict):
            choices.update({k: v for k, v in item.items() if isinstance(v, str)})
    return choices


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


def _values(o: Override) -> list[str] | None:
    """The values of an override, sweeps expanded; None for sweeps Hydra resolves itself."""
    try:
        return list(o.sweep_string_iterator()) if o.is_sweep_override() else [override_value(o)]
    except Exception:  # glob() and the like
        return None


def check_overrides(argv: list[str], conf_dir: Path) -> None:
    """Raise `ConfigError` for an unknown preset or key in the command-line overrides. A group key
    (`model.experts=16`) must exist in every preset the command selects for that group, since
    Hydra refuses to set a key a preset lacks, and in a multirun would stop before any job."""
    overrides = [o for o in parse_overrides(argv)
                 # `+key=`/`++key=`/`~key` say "I know this key is new or going"; hydra/* is Hydra's own.
                 if not (o.is_add() or o.is_force_add() or o.is_delete() or o.package is not None)
                 and not o.key_or_group.startswith("hydra") and "/" not in o.key_or_group]
    chosen: dict[str, list[str] | None] = {g: [c] for g, c in default_choices(conf_dir).items()}
    for o in overrides:
        key = o.key_or_group
        if key in GROUPS:
            values = _values(o)
            allowed_presets = presets(conf_dir, key)
            for value in values or ():
                if value not in allowed_presets:
                    raise ConfigError(key, value, allowed_presets)
            chosen[key] = values
    for o in overrides:
        key = o.key_or_group
        group, _, rest = key.partition(".")
        if group not in GROUPS:
            if key not in top_keys(conf_dir):
                allowed = [*top_keys(conf_dir), *GROUPS]
                raise ConfigError(key, override_value(o), f"top-level keys: {', '.join(allowed)}")
        elif rest:
            for name in chosen.get(group) or ():
                keys = preset_keys(conf_dir, group, name)
                if rest.split(".")[0] not in keys:
                    raise ConfigError(key, override_value(o), f"keys of {group}={name}: {', '.join(sorted(keys))}")
