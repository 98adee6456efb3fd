"""Checks on the command line that must happen before Hydra composes anything.

A group choice that does not exist (`model=nosuch`) or a misspelt key (`model.hiden=3`, `sq=5`)
fails Hydra's composition with a multi-line message, and in a multirun a bad choice kills the
sweep half-way. Checking overrides first turns each into one line that lists what is allowed,
before any job runs. Values themselves are checked per job (a bad value becomes an error row).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import cache
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf

from memsweep.capacity import check_margin
from memsweep.errors import ConfigError
from memsweep.results import GRIDS_NAME

GROUPS = ("model", "workload", "optimizer", "hardware", "parallel", "measure", "kernels", "formula")
SWITCHES = ("resume", "add")
"""Top-level true/false keys that say how to run a grid (checked before any job)."""
OPTIONAL_GROUPS = ("formula",)
"""Groups whose default is no option: `formula=null` spells the default out."""


def check_time(value: object, key: str = "time") -> None:
    """`time=`: null or a time_calibrated.yaml that loads (formulas.timing.constants_option)."""
    from memsweep.formulas.timing import constants_option  # numpy: only when `time` is given

    constants_option(value, key)


VALUE_CHECKS = {"margin": check_margin, "time": check_time}
"""Top-level keys every job shares a rule for, checked before any job: a bad value is one line
instead of an error row per job."""


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


@cache
def node_keys(conf_dir: Path, key: str) -> tuple[str, ...]:
    """The keys of a top-level mapping of config.yaml (`loss`: chunks, fused); () for a value."""
    node = OmegaConf.load(conf_dir / "config.yaml").get(key)
    return tuple(node.keys()) if OmegaConf.is_dict(node) else ()


def override_value(o: Override) -> str:
    """The value of an override as the user typed it (sweeps included)."""
    try:
        return o.get_value_element_as_str()
    except Exception:
        return o.input_line.split("=", 1)[-1]


VALUE_FLAGS = {"-cd": "--config-dir", "--config-dir": "--config-dir", "-cp": "--config-path",
               "--config-path": "--config-path", "-cn": "--config-name", "--config-name": "--config-name",
               "-c": "--cfg", "--cfg": "--cfg", "-p": "--package", "--package": "--package",
               "--experimental-rerun": "--experimental-rerun"}
"""Hydra's command-line flags that take a value (the next word, or after '=')."""


def split_argv(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(flags with values, overrides): `-cd DIR seq=1 -m` -> ({'--config-dir': 'DIR'}, ['seq=1'])."""
    flags, overrides, it = {}, [], iter(argv)
    for a in it:
        name, eq, value = a.partition("=")
        if a.startswith("-") and name in VALUE_FLAGS:
            flags[VALUE_FLAGS[name]] = value if eq else next(it, "")
        elif not a.startswith("-"):
            overrides.append(a)
    return flags, overrides


def user_conf_dirs(argv: list[str]) -> list[Path]:
    """Config folders the command adds to Hydra's search path (`--config-dir DIR`)."""
    flags, _ = split_argv(argv)
    return [Path(flags["--config-dir"]).expanduser()] if flags.get("--config-dir") else []


def parse_overrides(argv: list[str]) -> list[Override]:
    """Hydra's own parse of the command line; [] if it cannot parse (Hydra will say why)."""
    args = split_argv(argv)[1]
    try:
        return OverridesParser.create().parse_overrides(args)
    except Exception:  # not ours to report: Hydra will, with its own message
        return []


def override_values(o: Override) -> list[str] | None:
    """The values of an override, sweeps expanded; None for sweeps Hydra resolves itself."""
    try:
        return list(o.sweep_string_iterator()) if o.is_sweep_override() else [override_value(o)]
    except Exception:  # glob() and the like
        return None


def _number(value: str) -> object:
    """A command-line value as YAML reads a number ('0.1' -> 0.1, '2' -> 2); anything else as typed."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


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
            values = override_values(o)
            allowed_presets = sorted({*presets(conf_dir, key), *(n for d in user_conf_dirs(argv) for n in presets(d, key))})
            for value in values or ():
                if value == "null" and key in OPTIONAL_GROUPS:
                    continue
                if value not in allowed_presets:
                    raise ConfigError(key, value, [*allowed_presets, *(["null"] if key in OPTIONAL_GROUPS else [])])
            chosen[key] = values
    for o in overrides:
        key = o.key_or_group
        group, _, rest = key.partition(".")
        if group not in GROUPS:
            if group not in top_keys(conf_dir):
                allowed = [*top_keys(conf_dir), *GROUPS]
                raise ConfigError(key, override_value(o), f"top-level keys: {', '.join(allowed)}")
            nested = node_keys(conf_dir, group)
            if rest and rest.split(".")[0] not in nested:
                raise ConfigError(key, override_value(o), f"keys of {group}: {', '.join(nested) or 'none (a value)'}")
            if key in SWITCHES:
                for value in override_values(o) or [override_value(o)]:
                    if str(value).lower() not in ("true", "false"):
                        raise ConfigError(key, value, "true, false")
            if key in VALUE_CHECKS:
                for value in override_values(o) or ():
                    if "$" not in str(value):  # an interpolation resolves per job (and is checked there)
                        VALUE_CHECKS[key](_number(value), key)
        elif rest:
            for name in chosen.get(group) or ():
                keys = next((k for d in (conf_dir, *user_conf_dirs(argv)) if (k := preset_keys(d, group, name))), ())
                if rest.split(".")[0] not in keys:
                    raise ConfigError(key, override_value(o), f"keys of {group}={name}: {', '.join(sorted(keys))}")


def _override(argv: list[str], key: str) -> str | None:
    for o in parse_overrides(argv):
        if o.key_or_group == key and not o.is_delete():
            return override_value(o)
    return None


def output_dir(argv: list[str]) -> tuple[str, Path]:
    """The key and directory a command writes to: hydra.sweep.dir for a multirun, hydra.run.dir
    otherwise; by default their parent under outputs/ (the leaf is a timestamp)."""
    multirun = "-m" in argv or "--multirun" in argv
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    value = _override(argv, key)
    if value is not None and "${" not in value:
        return key, Path(value)
    return key, Path("outputs") / ("multirun" if multirun else "runs")


def check_writable(key: str, path: Path, probe_bytes: int = 64 * 1024) -> None:
    """Raise ConfigError when `path` (or the nearest directory above it that exists) cannot take
    a small file: read-only, not a directory, or no space left. Hydra would fail later with a
    traceback from its own config save."""
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if base.exists() and not base.is_dir():
        raise ConfigError(key, str(path), f"a directory ({base} is a file)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".memsweep-probe~", dir=base)
        try:
            os.write(fd, b"\0" * probe_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise ConfigError(key, str(path), f"a writable directory with free space ({base}: {exc.strerror or exc})") from None


GRID_NAME = GRIDS_NAME
"""A sweep directory's record of the grids run into it (see callbacks.check_grid); results' name."""


def grid_of(overrides: list[str]) -> list[str]:
    """A grid's identity: its overrides as typed, sorted, without Hydra's own and the switches."""
    keys = [(o, o.split("=", 1)[0].lstrip("+~")) for o in overrides]
    return sorted(o for o, k in keys if k not in SWITCHES and not k.startswith("hydra"))


def grid_tag(grid: list[str]) -> str:
    """The subdirectory of a grid added with add=true: grid-<hash of its overrides>."""
    return "grid-" + hashlib.sha1("\n".join(grid).encode()).hexdigest()[:8]


def recorded_grids(sweep_dir: Path) -> list[dict]:
    """[{overrides, subdir}, ...] from the sweep directory's record; [] when there is none."""
    try:
        return list(json.loads((sweep_dir / GRID_NAME).read_text())["grids"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def grid_subdir(argv: list[str]) -> list[str]:
    """Where this grid's jobs go inside the sweep directory: a grid already recorded there goes
    where it went before (resume); a new grid added with add=true to its own subdirectories
    (grid-<hash>/<job num>), so it never overwrites another grid's parts. [] = Hydra's default."""
    if _override(argv, "hydra.sweep.subdir") is not None:
        return []
    overrides = parse_overrides(argv)
    grid = grid_of([o.input_line for o in overrides])
    key, sweep_dir = output_dir(argv)
    recorded = {tuple(g.get("overrides", ())): g.get("subdir", "") for g in recorded_grids(sweep_dir)}
    adding = any(o.key_or_group == "add" and str(override_value(o)).lower() == "true" for o in overrides)
    sub = recorded.get(tuple(grid), grid_tag(grid) if adding else "")
    return [f"hydra.sweep.subdir={sub}/${{hydra.job.num}}"] if sub else []


def without_null_options(argv: list[str]) -> list[str]:
    """`formula=null` spells out the default (no option), which Hydra refuses for a config group:
    drop it. Inside a sweep (`formula=null,detailed`) it is refused in one line."""
    out = []
    for a in argv:
        key, eq, value = a.partition("=")
        if eq and key in OPTIONAL_GROUPS:
            values = value.split(",")
            if values == ["null"]:
                continue
            if "null" in values:
                raise ConfigError(key, value, "null alone (the default), or a list of options without null")
        out.append(a)
    return out
