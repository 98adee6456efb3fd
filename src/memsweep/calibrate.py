"""Calibration: refit a formula's constants to measured peaks by non-negative least squares.

Every seed formula is affine in the constants it declares calibratable, so its design matrix is
read off numerically: column i is total(theta + e_i) - total(theta). `detailed` is a maximum over
moments, which is affine in its per-term factors once the winning moment is fixed: its columns are
the terms of the moment that wins with the current constants, plus a column of ones for
`overhead_bytes`. Rows are weighted by 1 / measured, so the fit minimises *relative* error and a
70B model does not drown out a 1B one. Non-negativity keeps every constant physical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memsweep.columns import Columns
from memsweep.formulas import FORMULAS, TERMS, Formula

# What a calibration may change, per base formula (docs/formulas.md: F1's gradient factor; F2's bytes per
# parameter; F3's 34 (= 10 + 24) and 5; F4's multiplier; detailed's per-term factors + overhead).
CALIBRATABLE: dict[str, tuple[str, ...]] = {
    "seed_naive": ("weight_matrices", "gradient_factor"),
    "seed_mixed": ("weight_bytes_per_param", "activation_bytes_per_token_hidden_layer",
                   "gradient_bytes_per_param", "sgd_bytes_per_param", "momentum_bytes_per_param",
                   "adam_bytes_per_param"),
    "seed_korthikanti": ("replicated_sbh", "sharded_sbh", "scores_as2b", "checkpoint_sbh",
                         "weight_bytes_per_param", "gradient_bytes_per_param", "master_bytes_per_param",
                         "state_bytes"),
    "seed_rule4x": ("adam_multiplier", "sgd_multiplier"),
    "detailed": (*(f"{t}_factor" for t in TERMS if t != "overhead"), "overhead_bytes"),
}


def base_name(formula: Formula) -> str:
    """The built-in a (possibly calibrated) formula derives from: the one sharing its constants type."""
    return next(n for n, f in FORMULAS.items() if type(f.constants) is type(formula.constants))


def design(formula: Formula, c: Columns) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(offset, columns, names): total = offset + columns @ theta for the calibratable theta."""
    names = CALIBRATABLE[base_name(formula)]
    if base_name(formula) == "detailed":
        b = formula(c)
        k = formula.constants
        cols = [getattr(b, t) / max(getattr(k, f"{t}_factor"), 1e-12) for t in TERMS if t != "overhead"]
        cols.append(np.ones(len(c)))
        return np.zeros(len(c)), np.stack(cols, axis=1), names
    theta = {n: getattr(formula.constants, n) for n in names}
    here = formula(c).total
    cols = []
    for n in names:
        bumped = formula.with_constants(formula.name, **{n: theta[n] + 1.0})(c).total
        cols.append(bumped - here)
    A = np.stack(cols, axis=1)
    offset = here - A @ np.array([theta[n] for n in names])
    return offset, A, names


def identifiable(A: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Columns the data can inform: not all zero, and not in the span of the other such columns
    (a column that is constant across rows, e.g. every row of one model, is proportional to the
    other constant ones; columns that always move together cannot be told apart). Both members
    of a collinear pair are left out, so neither is zeroed in favour of the other."""
    live = np.linalg.norm(A, axis=0) > 0
    out = live.copy()
    for j in np.flatnonzero(live):
        others = live.copy()
        others[j] = False
        if not others.any():
            continue
        col = A[:, j]
        coef, *_ = np.linalg.lstsq(A[:, others], col, rcond=None)
        if np.linalg.norm(col - A[:, others] @ coef) <= tol * np.linalg.norm(col):
            out[j] = False
    return out


def nnls(A: np.ndarray, b: np.ndarray, max_iter: int = 500) -> np.ndarray:
    """min ||A x - b|| subject to x >= 0 (Lawson & Hanson 1974, active-set method)."""
    m, n = A.shape
    x = np.zeros(n)
    if n == 0:
        return x
    passive = np.zeros(n, dtype=bool)
    w = A.T @ (b - A @ x)
    tol = 10 * np.finfo(float).eps * max(1.0, np.abs(A).sum(axis=0).max()) * max(m, n)
    for _ in range(max_iter):
        if passive.all() or w[~passive].max(initial=-np.inf) <= tol:
            break
        j = np.argmax(np.where(passive, -np.inf, w))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if z[passive].min() > 0:
                x = z
                break
            mask = passive & (z <= 0)
            alpha = np.min(x[mask] / (x[mask] - z[mask]))
            x = x + alpha * (z - x)
            passive &= x > tol
        w = A.T @ (b - A @ x)
    return x


@dataclass(frozen=True)
class Calibration:
    formula: Formula
    """The calibrated variant (a new name, refitted constants)."""
    fitted: tuple[str, ...]
    """Constants the data could inform (the others keep their values)."""
    improved: bool = True
    """False when the refit did not lower the mean relative error: the constants were kept."""


def _informative(formula: Formula, c: Columns, measured: np.ndarray):
    """The fit's design (offset, A, constant names) and which constants the rows inform, judged on
    the rows weighed as the fit weighs them (relative error: 1 / measured)."""
    offset, A, names = design(formula, c)
    return offset, A, names, identifiable(A * (1.0 / measured)[:, None])


def calibrate(formula: Formula, c: Columns, measured: np.ndarray, name: str | None = None) -> Calibration:
    """Refit `formula`'s calibratable constants on rows `c` with measured peaks (bytes)."""
    measured = np.asarray(measured, dtype=float)
    offset, A, names, informative = _informative(formula, c, measured)
    # what the constants the data cannot inform contribute stays, at their current values
    theta = np.array([getattr(formula.constants, n) for n in names], dtype=float)
    offset = offset + A[:, ~informative] @ theta[~informative]
    scale = 1.0 / measured
    Aw = A[:, informative] * scale[:, None]
    bw = (measured - offset) * scale
    # columns span very different magnitudes (factors vs bytes): normalise for the solver
    norms = np.linalg.norm(Aw, axis=0)
    norms[norms == 0] = 1.0
    x = nnls(Aw / norms, bw) / norms
    values = {n: getattr(formula.constants, n) for n in names}
    for n, v in zip([n for n, i in zip(names, informative) if i], x):
        values[n] = float(v)
    fitted_names = tuple(n for n, i in zip(names, informative) if i)
    new_name = name or f"{formula.name}_calibrated"
    refit = formula.with_constants(new_name, **values)
    # Least squares minimises squared relative error; a formula that is already close may come
    # out with a (slightly) larger mean error. Never hand back something worse than the input.
    if mape(refit, c, measured) > mape(formula, c, measured):
        return Calibration(formula.with_constants(new_name), fitted_names, improved=False)
    return Calibration(refit, fitted_names)


MIN_MODELS = 2
"""Leave-one-model-out, the held-out check a refit must pass, fits on the other models' jobs and
predicts the one held out: it needs jobs of two models at least."""


def informed(formula: Formula, c: Columns, measured: np.ndarray) -> tuple[str, ...]:
    """The constants of `formula` these rows can inform (what `calibrate` would fit)."""
    _, _, names, keep = _informative(formula, c, np.asarray(measured, dtype=float))
    return tuple(n for n, i in zip(names, keep) if i)


def too_few_models(models: Sequence[str]) -> str | None:
    """Why jobs of these models cannot judge any refit (fewer than MIN_MODELS models), or None."""
    names = sorted(set(models))
    if len(names) >= MIN_MODELS:
        return None
    return (f"measured jobs of at least {MIN_MODELS} models (leave-one-model-out, the held-out check, fits "
            f"on the other models and predicts the one held out); these are {len(models)} job(s) of "
            f"{len(names)} model{'s' if len(names) != 1 else ''}{' (' + ', '.join(names) + ')' if names else ''}")


def too_few_rows(formula: Formula, c: Columns, measured: np.ndarray, models: Sequence[str]) -> str | None:
    """Why these rows cannot identify `formula`'s constants, or None. With any one model held out,
    the jobs left must outnumber the constants the fit moves: with as many jobs as constants (or
    fewer) every held-out fit is exact, whatever the constants, and judges nothing."""
    why = too_few_models(models)
    if why:
        return why
    fitted = informed(formula, c, measured)
    counts: dict[str, int] = {}
    for m in models:
        counts[m] = counts.get(m, 0) + 1
    largest = max(counts, key=lambda m: (counts[m], m))
    left = len(models) - counts[largest]
    if not fitted or left > len(fitted):
        return None
    return (f"more measured jobs outside each model than the {len(fitted)} constant(s) the fit moves "
            f"({', '.join(fitted)}), so that every leave-one-model-out fit is over-determined; holding out "
            f"{largest} leaves {left} job(s) of {len(models)}")


def constants_dict(formula: Formula) -> dict[str, float]:
    return {f.name: float(getattr(formula.constants, f.name)) for f in dataclasses.fields(formula.constants)}


def mape(formula: Formula, c: Columns, measured: np.ndarray) -> float:
    est = formula(c).total
    return float(np.mean(np.abs(est - measured) / measured) * 100.0)


def held_out(formula: Formula, c: Columns, measured: np.ndarray, groups: Sequence[str],
             seed: int = 0, test_fraction: float = 0.3) -> dict[str, float]:
    """MAPE before vs after calibration where the evaluated rows were not fitted:
    leave-one-model-out (fit on every other model, predict the left-out one) and a random split."""
    measured = np.asarray(measured, dtype=float)
    groups = np.asarray(groups)
    out: dict[str, float] = {}
    before, after = [], []
    for g in np.unique(groups):
        test = groups == g
        if test.all():
            continue
        fit = calibrate(formula, _take(c, ~test), measured[~test]).formula
        tc = _take(c, test)
        before.append(np.abs(formula(tc).total - measured[test]) / measured[test])
        after.append(np.abs(fit(tc).total - measured[test]) / measured[test])
    if before:
        out["lomo_before_pct"] = float(np.mean(np.concatenate(before)) * 100)
        out["lomo_after_pct"] = float(np.mean(np.concatenate(after)) * 100)
    rng = np.random.default_rng(seed)
    test = rng.random(len(measured)) < test_fraction
    if test.any() and (~test).any():
        fit = calibrate(formula, _take(c, ~test), measured[~test]).formula
        tc = _take(c, test)
        out["split_before_pct"] = float(np.mean(np.abs(formula(tc).total - measured[test]) / measured[test]) * 100)
        out["split_after_pct"] = float(np.mean(np.abs(fit(tc).total - measured[test]) / measured[test]) * 100)
    return out


def _take(c: Columns, mask: np.ndarray) -> Columns:
    return Columns(**{f.name: getattr(c, f.name)[mask] for f in dataclasses.fields(c)})
