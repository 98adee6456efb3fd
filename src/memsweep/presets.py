"""Specs from the shipped YAML presets by name, without Hydra (for scripts, tests and planning).

The presets live in the repository's `conf/`, which `pip install .` ships inside the package (or
in `$MEMSWEEP_CONF`; see `conf_dir`). The sweep itself composes them through Hydra; this is the
same data read directly, for code that builds many specs.
"""

from __future__ import annotations

import os
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from memsweep.errors import ConfigError
from memsweep.specs import (
    Hardware, JobSpec, MeasureSpec, ModelSpec, OptimizerSpec, Parallel, Workload, model_fields,
)


def conf_dir() -> Path:
    """The presets: `$MEMSWEEP_CONF`, else the checkout's `conf/` when this module runs from a
    checkout (plain or `pip install -e .`), else the copy a `pip install .` ships as package
    data (`memsweep/conf`, pyproject.toml maps the top-level conf/ onto it)."""
    if os.environ.get("MEMSWEEP_CONF"):
        return Path(os.environ["MEMSWEEP_CONF"])
    return checkout_conf() or Path(str(files("memsweep") / "conf"))


def checkout_conf() -> Path | None:
    """The checkout's conf/ when this module runs from a checkout (plain or editable), else None
    (a `pip install .`: its presets are package data, not a user's to change)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "conf" / "config.yaml").is_file():
        return root / "conf"
    return None


CONF_DIR = conf_dir()


RUNTIME_OPTIONS = {"model": ("hf",)}
"""Options that are not presets: `model=hf` reads a config.json given at sweep time."""


def preset_names(group: str) -> list[str]:
    skip = RUNTIME_OPTIONS.get(group, ())
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if p.stem not in skip)


@cache
def _load(group: str, name: str) -> dict[str, Any]:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file() or name in RUNTIME_OPTIONS.get(group, ()):
        raise ConfigError(group, name, preset_names(group))
    return yaml.safe_load(path.read_text())


def load_preset(group: str, name: str, **changes: Any) -> dict[str, Any]:
    return {**_load(group, name), **changes}


def model_spec(name: str, **changes: Any) -> ModelSpec:
    return ModelSpec(**model_fields(load_preset("model", name, **changes)))


def workload_spec(name: str = "train", **changes: Any) -> Workload:
    d = load_preset("workload", name, **changes)
    d["lora_targets"] = tuple(d.get("lora_targets") or ())
    return Workload(**d)


def job_spec(model: str | ModelSpec = "llama2-7b", *, wl: str | Workload = "train",
             optimizer: str | OptimizerSpec = "adamw", parallel: str | Parallel = "single",
             hardware: str | Hardware = "h100-80g", measure: str | MeasureSpec = "none",
             **top: Any) -> JobSpec:
    """A JobSpec from preset names (or specs), with the sweep's defaults for the top-level keys."""
    kwargs: dict[str, Any] = dict(seq=2048, batch=1, dtype="bf16", precision="mixed",
                                  recompute="none", attention="sdpa")
    kwargs.update(top)
    return JobSpec(
        model=model_spec(model) if isinstance(model, str) else model,
        workload=workload_spec(wl) if isinstance(wl, str) else wl,
        optimizer=OptimizerSpec(**load_preset("optimizer", optimizer)) if isinstance(optimizer, str) else optimizer,
        parallel=Parallel(**load_preset("parallel", parallel)) if isinstance(parallel, str) else parallel,
        hardware=Hardware(**load_preset("hardware", hardware)) if isinstance(hardware, str) else hardware,
        measure=MeasureSpec(**load_preset("measure", measure)) if isinstance(measure, str) else measure,
        **kwargs,
    )
