"""Estimators by name. Each is a pure function of `Columns` returning a per-GPU `Breakdown`."""

from __future__ import annotations

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
        Formula("seed_naive", naive, NaiveConstants(), "SPEC.md F1: blog formula"),
        Formula("seed_mixed", mixed, MixedConstants(), "SPEC.md F2: mixed-precision training bytes"),
        Formula("seed_korthikanti", korthikanti, KorthikantiConstants(),
                "SPEC.md F3: Korthikanti et al. 2022 activations + ZeRO model states"),
        Formula("seed_rule4x", rule4x, Rule4xConstants(), "SPEC.md F4: 12Lh^2 parameters, 4x rule"),
        Formula("detailed", peak_breakdown, DetailedConstants(), "memsweep: phase-by-phase PyTorch model"),
    )
}


def get_formula(name: str, key: str = "formulas") -> Formula:
    try:
        return FORMULAS[name]
    except KeyError:
        raise ConfigError(key, name, sorted(FORMULAS)) from None


__all__ = ["FORMULAS", "TERMS", "Breakdown", "Formula", "get_formula"]
