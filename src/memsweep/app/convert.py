"""The one conversion boundary: a composed Hydra config becomes a frozen `JobSpec`.

Unknown or missing keys and wrongly typed values fail here with a one-line `ConfigError`;
range and cross-field checks live in the spec dataclasses themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, fields
from functools import cache
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from memsweep.app.cli import GROUPS, top_keys
from memsweep.capacity import DEFAULT_MARGIN
from memsweep.errors import ConfigError
from memsweep.formulas import FORMULAS, Formula, formula_from_dict, get_formula
from memsweep.hf_config import config_path, default_name, read_config, spec_from_config, unmodelled_spec
from memsweep.presets import CONF_DIR
from memsweep.specs import (
    Hardware, JobSpec, KernelsSpec, LossSpec, MeasureSpec, OffloadSpec, ModelSpec, OptimizerSpec, Parallel, Workload, model_fields,
)

JOB_KEYS = ("seq", "batch", "dtype", "precision", "recompute", "attention")


@cache
def top_level_keys() -> frozenset[str]:
    """Every top-level key a job reads: conf/config.yaml's keys, its groups and Hydra's node; any
    other (`+foo=1`) is refused, not ignored."""
    return frozenset((*top_keys(CONF_DIR), *GROUPS, "hydra"))


@cache
def shipped_kind(workload: str) -> str | None:
    """The kind of the shipped workload preset of that name (conf/workload/), or None: overriding
    `workload.kind` under a shipped name would label a prefill `train`; a kind of one's own is a
    preset of one's own (any other name)."""
    path = CONF_DIR / "workload" / f"{workload}.yaml"
    return OmegaConf.load(path).get("kind") if path.is_file() else None


def precision_of(c: dict) -> str:
    """`precision`: auto (the default) is mixed for 16-bit training and pure otherwise; an explicit
    `mixed` where it cannot apply (fp32, inference, serving) is refused rather than run as pure
    under a `mixed` label."""
    value = c["precision"]
    workload = c.get("workload") if isinstance(c.get("workload"), dict) else {}
    training = workload.get("kind") in ("train", "lora")
    sixteen = c.get("dtype") in ("fp16", "bf16")
    if value == "auto":
        return "mixed" if training and sixteen else "pure"
    if value == "mixed" and not (training and sixteen):
        why = (f"dtype={c.get('dtype')}" if training else f"workload={workload.get('name')} "
               f"(kind {workload.get('kind')})")
        raise ConfigError("precision", value, f"pure or auto for {why} (mixed precision is 16-bit training "
                                              "over fp32 master weights)")
    return value


def _group(cls: type, group: str, values: Any) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(group, values, f"a {group} preset (a mapping of {cls.__name__} fields)")
    names = {f.name for f in fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{group}.{key}", values[key], f"known keys: {', '.join(sorted(names))}")
    for f in fields(cls):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in values:
            raise ConfigError(f"{group}.{f.name}", "missing", "a value for every required key")
    return values


def resolved(cfg: DictConfig) -> dict:
    """The config as plain data; an interpolation that cannot resolve (`seq=${nosuch}`) is a
    ConfigError naming the key that holds it."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raw = OmegaConf.select(cfg, key, throw_on_resolution_failure=False) if key != "config" else None
        if raw is None and key != "config":
            raw = cfg._get_node(key)._value() if cfg._get_node(key) is not None else None
        why = str(exc).strip().splitlines()[0]
        raise ConfigError(key, raw, f"a value, or an interpolation that resolves ({why})") from None


def to_job_spec(cfg: DictConfig | dict) -> JobSpec:
    c = resolved(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    for key in c:
        if key not in top_level_keys():
            raise ConfigError(key, c[key], f"top-level keys: {', '.join(top_keys(CONF_DIR))} "
                                           f"and the groups {', '.join(GROUPS)}")
    model = model_of(c.get("model"), c.get("measure"))
    w = dict(_group(Workload, "workload", c.get("workload")))
    shipped = shipped_kind(w["name"]) if isinstance(w.get("name"), str) else None
    if shipped is not None and w.get("kind") != shipped:
        raise ConfigError("workload.kind", w.get("kind"), f"{shipped} under workload={w['name']} (for another "
                                                         f"kind choose its preset: workload=inference, ...)")
    targets = w.get("lora_targets", ())
    if isinstance(targets, str) or not isinstance(targets, (list, tuple)):
        raise ConfigError("workload.lora_targets", targets, "a list of q, k, v, o, gate, up, down")
    w["lora_targets"] = tuple(targets)
    missing = [k for k in JOB_KEYS if k not in c]
    if missing:
        raise ConfigError(missing[0], "missing", "a value at the top level of the config")
    option = c.get("formula")
    if option is not None and not isinstance(option, dict):
        raise ConfigError("formula", option, f"an option of conf/formula/ ({', '.join(FORMULAS)} or a calibrated one)")
    formulas = formulas_of(c)
    constants = {}
    if isinstance(option, dict):
        extra = formulas[-1]  # formulas_of puts the option last
        constants = {f.name: float(getattr(extra.constants, f.name)) for f in fields(extra.constants)}
    return JobSpec(
        model=model,
        workload=Workload(**w),
        optimizer=OptimizerSpec(**_group(OptimizerSpec, "optimizer", c.get("optimizer"))),
        parallel=Parallel(**_group(Parallel, "parallel", c.get("parallel"))),
        hardware=Hardware(**_group(Hardware, "hardware", c.get("hardware"))),
        formulas=tuple(f.name for f in formulas),
        measure=MeasureSpec(**_group(MeasureSpec, "measure", c.get("measure", {"name": "none"}))),
        formula_constants=tuple(sorted(constants.items())),
        formula_option=formulas[-1].name if isinstance(option, dict) else None,
        formula_base=option.get("base") if isinstance(option, dict) else None,
        loss=LossSpec(**_group(LossSpec, "loss", c.get("loss", {}))),
        kv_dtype=c.get("kv_dtype", "auto"),
        offload=OffloadSpec(**_group(OffloadSpec, "offload", c.get("offload", {}))),
        kernels=KernelsSpec(**_group(KernelsSpec, "kernels", c.get("kernels", {}))),
        grad_accum=c.get("grad_accum", 1),
        mixed_policy=c.get("mixed_policy", "autocast"),
        margin=c.get("margin", DEFAULT_MARGIN),
        **{k: c[k] for k in JOB_KEYS if k != "precision"},
        precision=precision_of(c),
    )


def time_constants_of(cfg: DictConfig | dict):
    """The `time` key: null (the time model's built-in constants) or the path of a
    time_calibrated.yaml (`scripts/fit.py --calibrate`); a bad one is a ConfigError naming `time`."""
    from memsweep.formulas.timing import constants_option

    value = OmegaConf.select(cfg, "time", default=None) if isinstance(cfg, DictConfig) else cfg.get("time")
    return constants_option(value, key="time")


def measured_by_transformers(measure: Any) -> bool:
    return isinstance(measure, dict) and measure.get("impl") == "hf" and measure.get("backend") not in (None, "none")


def model_of(values: Any, measure: Any = None) -> ModelSpec:
    """A preset's fields, or (`model=hf model.config=PATH`) a local config.json read at run time.
    A config.json the importer refuses (an architecture no formula models) is still measured when
    `measure` is transformers' (issue 12, part 3): the spec says why it is unmodelled."""
    if isinstance(values, dict) and "config" in values:
        extra = sorted(set(values) - {"name", "config"})
        if extra:
            raise ConfigError(f"model.{extra[0]}", values[extra[0]],
                              "only model.name and model.config with model=hf (import a preset to edit it)")
        if values["config"] in (None, "???", ""):
            raise ConfigError("model.config", "missing", "a local config.json: model=hf model.config=PATH")
        name = values.get("name")
        name = default_name(values["config"]) if name in (None, "hf") else str(name)
        source = str(config_path(values["config"]).resolve())
        cfg = read_config(values["config"])
        try:
            spec = spec_from_config(cfg, name)
        except ConfigError as exc:
            if not isinstance(cfg, dict):
                raise
            if not measured_by_transformers(measure):
                raise ConfigError(exc.key, exc.value, f"{exc.allowed} (or measure the model with transformers "
                                                      "alone: measure=fake measure.impl=hf)") from None
            return unmodelled_spec(cfg, name, source, str(exc))
        return dataclasses.replace(spec, source=source)
    return ModelSpec(**model_fields(_group(ModelSpec, "model", values)))


def formulas_of(c: dict) -> list[Formula]:
    """`formulas`: `all` (the built-ins) or a list of names; the `formula` group (`formula=X`,
    also from a user config folder: `--config-dir DIR`) adds option X, with its constants. A
    calibrated formula joins a sweep only when it is selected so, never through `all`."""
    names = c.get("formulas")
    if names in (None, "all"):
        chosen = list(FORMULAS.values())
    else:
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, (list, tuple)) or not names:
            raise ConfigError("formulas", names, f"a list of {', '.join(FORMULAS)} (or all)")
        duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if duplicate is not None:
            raise ConfigError("formulas", names, f"each formula once ({duplicate} is listed twice)")
        chosen = [get_formula(n) for n in names]
    option = c.get("formula")
    if isinstance(option, dict):
        extra = formula_from_dict(option)
        chosen = [f for f in chosen if f.name != extra.name] + [extra]
    return chosen
