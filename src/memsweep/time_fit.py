"""Step time against measurement: signed errors per phase, and a refit of the time model's constants.

The memory side's fit.py / calibrate.py, for `formulas/timing.py`. A *timed* job is one whose rows
carry a measured step (`measure=cuda` times every phase with CUDA events; `measure=cpu` times them
with perf_counter, real times but no GPU's, so they join only when asked for: `backends`). Rows
repeat per formula; a job is one (sweep_id, job_id).

Errors. Each job gives one row per phase it has both an estimate and a measurement of: `step`
(est_step_time_s vs step_time_s), `forward`, `backward`, `optimizer` (training), `prefill`,
`decode_token` (inference, one decoded token). error_pct = 100 (estimated - measured) / measured,
with the estimate the sweep recorded; a part older than the time model (no est_* at all) gets it
computed from its spec with the built-in constants.

Calibration. Each job's spec (`spec_json`) becomes Columns and hardware Speeds; the calibratable
constants (timing.CALIBRATABLE) are fitted to minimise the mean squared log ratio
log(estimated / measured) over the phase rows, every job weighing the same (its rows 1 / n each),
so a 70B step does not drown a 1B one and being 2x slow costs what 2x fast does. The model is a
roofline (a max of two limits), not smooth: the search is derivative-free and deterministic,
coordinate descent over a log grid of each efficiency (a linear one of dp_overlap) followed by a
golden-section refinement between the best grid point's neighbours, repeated until no coordinate
moves. Efficiencies stay in [0.02, 1], dp_overlap in [0, 1]. A constant moves only when the data
can tell: halving or doubling it (dp_overlap: 0 or 1) must change some estimated phase time by
more than 0.1 % (one GPU's rows never see comm_efficiency or dp_overlap). Held out:
leave-one-model-out with three models or more, else 5-fold over jobs; the calibrated constants
are written (`time_calibrated.yaml`) only when they lower that held-out error, and only when every
held-out fit has more jobs than the constants it moves (`too_few_jobs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from memsweep.columns import Columns
from memsweep.errors import ConfigError
from memsweep.formulas.timing import (
    CALIBRATABLE, Speeds, TimeConstants, constants_to_dict, production_work, step_time,
)

PHASES = ("step", "forward", "backward", "optimizer", "prefill", "decode_token")
ESTIMATED = {"step": "est_step_time_s", "forward": "est_forward_s", "backward": "est_backward_s",
             "optimizer": "est_optimizer_s", "prefill": "est_prefill_s", "decode_token": "est_decode_token_s"}
MEASURED = {"step": "step_time_s", "forward": "measured_forward_s", "backward": "measured_backward_s",
            "optimizer": "measured_optimizer_s", "prefill": "measured_prefill_s",
            "decode_token": "measured_decode_token_s"}
TIME_BACKENDS = ("cuda", "cpu")
DEFAULT_BACKENDS = ("cuda",)
GROUPINGS = ("model", "workload", "hardware")
"""The error tables besides the one by phase; each is by phase within the group."""
DESCRIBE = ("model", "workload", "seq", "batch", "dtype", "precision", "recompute", "hardware")

FIT_BOUNDS: dict[str, tuple[float, float]] = {
    "compute_efficiency": (0.02, 1.0), "memory_efficiency": (0.02, 1.0),
    "comm_efficiency": (0.02, 1.0), "dp_overlap": (0.0, 1.0),
}
LOG_SCALE = frozenset({"compute_efficiency", "memory_efficiency", "comm_efficiency"})
IDENTIFY_REL = 1e-3
"""A constant is identifiable when moving it changes some estimated phase time by more than this."""


def parse_backends(text: str | Sequence[str] | None, key: str = "--time-backend") -> tuple[str, ...]:
    """'cuda' / 'cpu' / 'cuda,cpu' -> backends (a ConfigError naming the key otherwise)."""
    if text is None:
        return DEFAULT_BACKENDS
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [n for n in names if n not in TIME_BACKENDS]
    if not names or bad:
        raise ConfigError(key, text, "cuda, cpu or cuda,cpu (measure backends that time each phase)")
    return tuple(dict.fromkeys(names))


# --- timed jobs and their errors ----------------------------------------------------------------

def timed_jobs(table: pl.DataFrame, backends: Sequence[str] = DEFAULT_BACKENDS) -> pl.DataFrame:
    """One row per timed job (status ok, backend in `backends`, a measured step or phase)."""
    if not table.height or "measure_backend" not in table.columns:
        return table.clear()
    timed = pl.any_horizontal([pl.col(c).fill_null(0.0) > 0 for c in MEASURED.values()])
    return (table.filter(pl.col("status") == "ok", pl.col("measure_backend").is_in(list(backends)), timed)
            .unique(["sweep_id", "job_id"], keep="first", maintain_order=True))


def timed_elsewhere(table: pl.DataFrame, backends: Sequence[str]) -> dict[str, int]:
    """Timed jobs of the other backends (left out unless asked for), by backend."""
    other = [b for b in TIME_BACKENDS if b not in backends]
    jobs = timed_jobs(table, other) if other else table.clear()
    return {b: int(n) for b, n in jobs.group_by("measure_backend").len().iter_rows()} if jobs.height else {}


def time_errors(jobs: pl.DataFrame) -> pl.DataFrame:
    """The long table: one row per (job, phase) with both times; `job` is the job_id."""
    jobs = _with_fallback_estimates(jobs)
    keep = ["sweep_id", "job_id", *DESCRIBE, "measure_backend"]
    parts = [jobs.select(*keep, pl.lit(phase).alias("phase"), pl.col(ESTIMATED[phase]).alias("estimated_s"),
                         pl.col(MEASURED[phase]).cast(pl.Float64).alias("measured_s"))
             for phase in PHASES]
    long = pl.concat(parts, how="vertical") if parts else pl.DataFrame()
    long = long.filter(pl.col("estimated_s").is_not_null(), pl.col("estimated_s").is_finite(),
                       pl.col("estimated_s") > 0, pl.col("measured_s").is_not_null(), pl.col("measured_s") > 0)
    long = long.with_columns((100.0 * (pl.col("estimated_s") - pl.col("measured_s")) / pl.col("measured_s"))
                             .alias("error_pct"))
    order = pl.col("phase").replace_strict(list(PHASES), list(range(len(PHASES))), return_dtype=pl.Int64)
    first = ("job", "phase", "estimated_s", "measured_s", "error_pct")
    long = long.rename({"job_id": "job"}).sort(["job", order], maintain_order=True)
    return long.select(*first, *[c for c in long.columns if c not in first])


def _with_fallback_estimates(jobs: pl.DataFrame) -> pl.DataFrame:
    """Jobs written before the time model (no est_* at all): estimated here, built-in constants."""
    missing = jobs.select(pl.all_horizontal([pl.col(c).is_null() for c in ESTIMATED.values()])).to_series()
    if not missing.any():
        return jobs
    old = jobs.filter(missing)
    data = time_data(old)
    est = estimates(data, TimeConstants())
    filled = old.with_columns([pl.Series(ESTIMATED[p], np.where(np.isfinite(est[p]), est[p], np.nan),
                                         dtype=pl.Float64).fill_nan(None) for p in PHASES])
    return pl.concat([jobs.filter(~missing), filled], how="vertical_relaxed")


def describe(columns: Sequence[str] = DESCRIBE) -> pl.Expr:
    """'llama3-8b train seq=2048 batch=1 bf16/mixed recompute=none h100-80g'."""
    parts = [pl.col(c).cast(pl.String) if c not in ("seq", "batch", "recompute") else
             pl.lit(f"{c}=") + pl.col(c).cast(pl.String) for c in columns]
    return pl.concat_str(parts, separator=" ", ignore_nulls=True).alias("config")


def error_summary(errors: pl.DataFrame, by: Sequence[str]) -> pl.DataFrame:
    """count, median |error|, MAPE, mean signed error, worst |error| and where, per group."""
    e = errors.with_columns(pl.col("error_pct").abs().alias("abs_err"), describe())
    order = pl.col("phase").replace_strict(list(PHASES), list(range(len(PHASES))), return_dtype=pl.Int64)
    return (e.group_by(list(by), maintain_order=True)
            .agg(pl.len().alias("count"),
                 pl.col("abs_err").median().alias("median_abs_pct"),
                 pl.col("abs_err").mean().alias("mape_pct"),
                 pl.col("error_pct").mean().alias("mean_signed_pct"),
                 pl.col("abs_err").max().alias("worst_abs_pct"),
                 pl.col("error_pct").sort_by("abs_err").last().alias("worst_signed_pct"),
                 pl.col("config").sort_by("abs_err").last().alias("worst_config"))
            .sort([*(c for c in by if c != "phase"), order]))


def error_tables(errors: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """By phase, then by model, workload and hardware (each by phase within the group)."""
    out = {"phase": error_summary(errors, ["phase"])}
    for key in GROUPINGS:
        out[key] = error_summary(errors, [key, "phase"])
    return out


# --- calibration --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TimeData:
    """Timed jobs as the time model sees them: their Columns, work, speeds and measured phases."""

    cols: Columns
    work: object
    speeds: Speeds
    gen_tokens: np.ndarray
    training: np.ndarray
    measured: dict[str, np.ndarray]   # phase -> seconds per job (NaN: not measured)
    models: np.ndarray

    def __len__(self) -> int:
        return len(self.models)

    def take(self, mask: np.ndarray) -> TimeData:
        cols = Columns(**{f.name: getattr(self.cols, f.name)[mask] for f in dataclasses.fields(self.cols)})
        speeds = Speeds(*(getattr(self.speeds, f.name)[mask] for f in dataclasses.fields(self.speeds)))
        return TimeData(cols, production_work(cols), speeds, self.gen_tokens[mask], self.training[mask],
                        {p: v[mask] for p, v in self.measured.items()}, self.models[mask])


def time_data(jobs: pl.DataFrame) -> TimeData:
    """Rebuild every job's spec (fit.spec_of_row) into the time model's inputs."""
    from memsweep.fit import specs_of_rows

    specs = specs_of_rows(jobs)
    cols = Columns.from_specs(specs)
    measured = {p: jobs[MEASURED[p]].cast(pl.Float64).fill_null(np.nan).to_numpy().astype(float) for p in PHASES}
    return TimeData(cols, production_work(cols), Speeds.of([s.hardware for s in specs], [s.dtype for s in specs]),
                    np.array([s.gen_tokens if not s.workload.training else 0 for s in specs], dtype=float),
                    np.array([s.workload.training for s in specs], dtype=bool), measured,
                    np.array([s.model.name for s in specs]))


def estimates(data: TimeData, k: TimeConstants) -> dict[str, np.ndarray]:
    """Each phase's estimate per job, as estimate.time_fields records it (NaN where it has none)."""
    t = step_time(data.cols, data.speeds, k, work=data.work)
    nan = np.full(len(data), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        decode = np.where(data.gen_tokens > 0, t.decode_s / np.maximum(data.gen_tokens, 1.0), np.nan)
    return {"step": t.step_s,
            "forward": np.where(data.training, t.forward_s, nan),
            "backward": np.where(data.training, t.backward_s, nan),
            "optimizer": np.where(data.training, t.optimizer_s, nan),
            "prefill": np.where(data.training, nan, t.prefill_s),
            "decode_token": np.where(data.training, nan, decode)}


@dataclass(frozen=True)
class Problem:
    """The phase rows a fit uses: (job, phase) pairs with a positive measurement and estimate."""

    data: TimeData
    mask: dict[str, np.ndarray]     # phase -> jobs that have that row
    weight: dict[str, np.ndarray]   # phase -> per job: 1 / (rows of the job x jobs)

    @classmethod
    def of(cls, data: TimeData, k: TimeConstants) -> Problem:
        est = estimates(data, k)
        mask = {p: np.isfinite(est[p]) & (est[p] > 0) & np.isfinite(data.measured[p]) & (data.measured[p] > 0)
                for p in PHASES}
        rows = sum(m.astype(float) for m in mask.values())
        jobs = max(int((rows > 0).sum()), 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            per_row = np.where(rows > 0, 1.0 / (rows * jobs), 0.0)
        return cls(data, mask, {p: np.where(mask[p], per_row, 0.0) for p in PHASES})

    @property
    def rows(self) -> int:
        return int(sum(m.sum() for m in self.mask.values()))

    def loss(self, k: TimeConstants) -> float:
        """Mean (per job) of the mean squared log ratio of its phase rows."""
        est = estimates(self.data, k)
        total = 0.0
        for p in PHASES:
            m = self.mask[p]
            if m.any():
                with np.errstate(divide="ignore", invalid="ignore"):
                    r = np.log(est[p][m] / self.data.measured[p][m])
                if not np.isfinite(r).all():
                    return np.inf
                total += float(np.sum(self.weight[p][m] * r * r))
        return total

    def mape(self, k: TimeConstants) -> float:
        """Mean |error| % over every phase row (each row once, as the error tables count)."""
        est = estimates(self.data, k)
        errs = [np.abs(est[p][m] / self.data.measured[p][m] - 1.0) for p in PHASES if (m := self.mask[p]).any()]
        return float(np.mean(np.concatenate(errs)) * 100.0) if errs else float("nan")

    def changed(self, a: TimeConstants, b: TimeConstants) -> float:
        """The largest relative change of any phase row's estimate from constants a to b."""
        ea, eb = estimates(self.data, a), estimates(self.data, b)
        diffs = [np.abs(eb[p][m] / ea[p][m] - 1.0) for p in PHASES if (m := self.mask[p]).any()]
        return float(np.max(np.concatenate(diffs))) if diffs else 0.0


def identifiable(problem: Problem, k: TimeConstants) -> dict[str, bool]:
    """Constants the rows can tell: halving or doubling one (dp_overlap: 0, 1) changes some
    estimated phase time by more than IDENTIFY_REL."""
    out = {}
    for name in CALIBRATABLE:
        v = getattr(k, name)
        lo, hi = FIT_BOUNDS[name]
        trials = (0.0, 0.5, 1.0) if name == "dp_overlap" else (v * 0.5, v * 2.0)
        trials = [float(np.clip(t, lo, hi)) for t in trials if abs(np.clip(t, lo, hi) - v) > 1e-12]
        out[name] = any(problem.changed(k, dataclasses.replace(k, **{name: t})) > IDENTIFY_REL for t in trials)
    return out


GRID_POINTS = 33
GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


def minimize(f: Callable[[dict[str, float]], float], start: dict[str, float], names: Sequence[str],
             sweeps: int = 25, tol: float = 1e-7) -> dict[str, float]:
    """Coordinate descent: each coordinate on a grid over its bounds (log for efficiencies), then
    golden section between the best grid point's neighbours; a move is taken only when it lowers
    f. Sweeps repeat until none moves. Deterministic."""
    to_x = lambda n, v: np.log(v) if n in LOG_SCALE else v  # noqa: E731
    from_x = lambda n, x: float(np.exp(x)) if n in LOG_SCALE else float(x)  # noqa: E731
    values = {n: float(np.clip(v, *FIT_BOUNDS[n])) if n in names else float(v) for n, v in start.items()}
    best = f(values)
    for _ in range(sweeps):
        before = best
        for n in names:
            lo, hi = (to_x(n, b) for b in FIT_BOUNDS[n])
            trial = lambda x: f({**values, n: from_x(n, x)})  # noqa: E731,B023
            grid = np.linspace(lo, hi, GRID_POINTS)
            losses = np.array([trial(x) for x in grid])
            i = int(np.argmin(losses))
            a, b = grid[max(i - 1, 0)], grid[min(i + 1, GRID_POINTS - 1)]
            x, fx = _golden(trial, a, b, tol)
            candidates = [(fx, x), (float(losses[i]), grid[i])]
            fc, xc = min(candidates, key=lambda c: c[0])
            if fc < best - 1e-15 * max(1.0, abs(best)):
                values[n], best = from_x(n, xc), fc
        if before - best <= 1e-12 * max(1.0, abs(before)):
            break
    return values


def _golden(f: Callable[[float], float], a: float, b: float, tol: float) -> tuple[float, float]:
    """Golden-section search for a minimum of f on [a, b] (to width tol)."""
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = f(d)
    return (c, fc) if fc <= fd else (d, fd)


@dataclass(frozen=True)
class TimeCalibration:
    constants: TimeConstants
    start: TimeConstants
    fitted: tuple[str, ...]
    """Constants the data could tell (moved or not); the others kept their start values."""
    jobs: int
    rows: int
    mape_before_pct: float
    mape_after_pct: float
    at_bound: tuple[str, ...] = ()
    """Fitted constants that ended on a bound (the data want a value beyond it)."""


def calibrate_time(data: TimeData, start: TimeConstants = TimeConstants()) -> TimeCalibration:
    """Refit the identifiable constants of `start` to the timed jobs in `data`."""
    problem = Problem.of(data, start)
    ident = identifiable(problem, start) if problem.rows else dict.fromkeys(CALIBRATABLE, False)
    names = tuple(n for n in CALIBRATABLE if ident[n])
    values = constants_to_dict(start)
    if names:
        values = minimize(lambda v: problem.loss(TimeConstants(**v)), values, names)
    fitted = TimeConstants(**values)
    if problem.rows and problem.loss(fitted) > problem.loss(start):  # never hand back something worse
        fitted = start
    at_bound = tuple(n for n in names if n in LOG_SCALE and min(abs(values[n] - b) for b in FIT_BOUNDS[n]) < 1e-6)
    return TimeCalibration(fitted, start, names, int((sum(problem.mask.values()) > 0).sum()) if problem.rows else 0,
                           problem.rows, problem.mape(start), problem.mape(fitted), at_bound)


def held_out_groups(data: TimeData, folds: int = 5, seed: int = 0) -> tuple[np.ndarray, str] | None:
    """Each job's held-out group and how they were made: leave-one-model-out with 3 models or
    more, else `folds`-fold over jobs (a seeded shuffle); None with fewer than two jobs."""
    n = len(data)
    if len(np.unique(data.models)) >= 3:
        return data.models, "leave-one-model-out"
    k = min(folds, n)
    if k < 2:
        return None
    return np.random.default_rng(seed).permutation(n) % k, f"{k}-fold"


def too_few_jobs(data: TimeData, start: TimeConstants = TimeConstants(), folds: int = 5,
                 seed: int = 0) -> str | None:
    """Why these timed jobs cannot identify the constants the fit would move, or None: with any
    held-out group left out, the jobs left must outnumber those constants (else each held-out fit
    can match its jobs whatever the constants, and judges nothing)."""
    problem = Problem.of(data, start)
    fitted = [n for n, ok in identifiable(problem, start).items() if ok] if problem.rows else []
    if not fitted:
        return None
    grouping = held_out_groups(data, folds, seed)
    if grouping is None:
        return (f"more timed jobs than the {len(fitted)} constant(s) the fit moves ({', '.join(fitted)}) once "
                f"a held-out group is left out; these are {len(data)} job(s)")
    groups, how = grouping
    _, sizes = np.unique(groups, return_counts=True)
    left = len(data) - int(sizes.max())
    if left > len(fitted):
        return None
    return (f"more timed jobs than the {len(fitted)} constant(s) the fit moves ({', '.join(fitted)}) in every "
            f"{how} fit, so that each is over-determined; the smallest leaves {left} job(s) of {len(data)}")


def held_out(data: TimeData, start: TimeConstants = TimeConstants(), folds: int = 5,
             seed: int = 0) -> dict[str, object]:
    """MAPE of the held-out jobs' phase rows, before (start) and after (fitted on the others):
    leave-one-model-out with 3 models or more, else `folds`-fold over jobs (a seeded shuffle)."""
    grouping = held_out_groups(data, folds, seed)
    if grouping is None:
        return {"held_out": "none (one job)"}
    groups, how = grouping
    before, after = [], []
    for g in np.unique(groups):
        test = groups == g
        train = data.take(~test)
        fit = calibrate_time(train, start).constants
        p = Problem.of(data.take(test), start)
        if not p.rows:
            continue
        eb, ea = estimates(p.data, start), estimates(p.data, fit)
        for ph in PHASES:
            m = p.mask[ph]
            before.append(np.abs(eb[ph][m] / p.data.measured[ph][m] - 1.0))
            after.append(np.abs(ea[ph][m] / p.data.measured[ph][m] - 1.0))
    if not before:
        return {"held_out": "none (no rows)"}
    return {"held_out": how,
            "held_out_before_pct": float(np.mean(np.concatenate(before)) * 100.0),
            "held_out_after_pct": float(np.mean(np.concatenate(after)) * 100.0)}
