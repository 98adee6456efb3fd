"""Estimators by name. Each is a pure function of `Columns` returning a per-GPU `Breakdown`."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from memsweep.errors import ConfigError
from memsweep.formulas.base import TERMS, Breakdown, Formula
from memsweep.formulas.detailed import DetailedConstants, peak_breakdown
from memsweep.formulas.seeds import (
    KorthikantiConstants, MixedConstants, NaiveConstants, Rule4xConstants, korthikanti, mixed,
    naive, rule4x,
)

FORMULAS: dict[str, Formula] = {
    f.name: f
    for f in (
        Formula("seed_naive", naive, NaiveConstants(), "docs/formulas.md F1: a blog formula, kept as written"),
        Formula("seed_mixed", mixed, MixedConstants(), "docs/formulas.md F2: mixed-precision training bytes"),
        Formula("seed_korthikanti", korthikanti, KorthikantiConstants(),
                "Korthikanti et al. 2022 (arXiv:2205.05198) activations + ZeRO model states (arXiv:1910.02054); docs/formulas.md F3"),
        Formula("seed_rule4x", rule4x, Rule4xConstants(), "12Lh^2 parameters (Kaplan et al. 2020, arXiv:2001.08361), 4x rule; docs/formulas.md F4"),
        Formula("detailed", peak_breakdown, DetailedConstants(), "memsweep: phase-by-phase PyTorch model"),
    )
}


def calibrated_names(conf_dir: Path | None = None) -> list[str]:
    """Variants in conf/formula/ beyond the built-ins (written by `scripts/fit.py --calibrate`)."""
    d = (conf_dir or default_conf_dir()) / "formula"
    return sorted(p.stem for p in d.glob("*.yaml") if p.stem not in FORMULAS) if d.is_dir() else []


def default_conf_dir() -> Path:
    from memsweep.presets import CONF_DIR

    return CONF_DIR


def formula_from_dict(data: dict, key: str = "formula") -> Formula:
    """A formula option: `{name, base, constants: {...}, provenance: {...}}` (conf/formula/*.yaml)."""
    if not isinstance(data, dict):
        raise ConfigError(key, data, "a formula option: name, base and constants")
    base = data.get("base")
    if not isinstance(base, str) or base not in FORMULAS:
        raise ConfigError(f"{key}.base", base, sorted(FORMULAS))
    name = data.get("name", base)
    if not isinstance(name, str) or not name.strip() or "/" in name or name.startswith("."):
        raise ConfigError(f"{key}.name", name, "a non-empty formula name (no path)")
    known = FORMULAS[base].constant_names()
    constants = data.get("constants") or {}
    if not isinstance(constants, dict):
        raise ConfigError(f"{key}.constants", constants, f"a mapping of {', '.join(known)}")
    for const, value in constants.items():
        if const not in known:
            raise ConfigError(f"{key}.constants.{const}", value, known)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            # every constant scales a memory term or is one (calibration fits them >= 0, NNLS)
            raise ConfigError(f"{key}.constants.{const}", value, "a finite number >= 0 (it scales a memory term)")
    formula = FORMULAS[base].with_constants(name, **{k: float(v) for k, v in constants.items()})
    if all(getattr(formula.constants, c) == 0 for c in known):
        raise ConfigError(f"{key}.constants", constants, "at least one constant > 0 (with every one 0 the formula "
                                                         "predicts no memory at all)")
    return formula


def load_calibrated(path: Path) -> Formula:
    return formula_from_dict(yaml.safe_load(Path(path).read_text()), key=f"formula/{Path(path).stem}")


def get_formula(name: str, key: str = "formulas", conf_dir: Path | None = None) -> Formula:
    """A built-in formula, a calibrated variant from conf/formula/<name>.yaml, or a calibrated
    YAML by its path (`plan.py formula=outputs/.../fit/detailed_calibrated.yaml`)."""
    if isinstance(name, str) and name in FORMULAS:
        return FORMULAS[name]
    if isinstance(name, str) and name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(key, name, "a built-in formula name or an existing calibrated YAML file")
        try:
            return load_calibrated(path)
        except (OSError, yaml.YAMLError, AttributeError) as exc:
            raise ConfigError(key, name, f"a calibrated formula YAML ({type(exc).__name__})") from None
    calibrated = calibrated_names(conf_dir)
    if isinstance(name, str) and name in calibrated:  # a name, never a path into another group
        return load_calibrated((conf_dir or default_conf_dir()) / "formula" / f"{name}.yaml")
    raise ConfigError(key, name, [*FORMULAS, *calibrated])


def job_formulas(spec) -> list[Formula]:
    """The formulas a job evaluates: its names, with the `formula` option's constants applied
    to the formula of that name (`formula=detailed formula.constants.overhead_bytes=1e9`)."""
    out = []
    for name in spec.formulas:
        if name == spec.formula_option:
            out.append(FORMULAS[spec.formula_base].with_constants(name, **dict(spec.formula_constants)))
        else:
            out.append(get_formula(name))
    return out


__all__ = ["FORMULAS", "TERMS", "Breakdown", "Formula", "calibrated_names", "formula_from_dict",
           "get_formula", "job_formulas", "load_calibrated"]
