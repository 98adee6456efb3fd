"""The plan against measurement: predicted fits (the plan's rule) against measured cuda ok / oom,
and the measured largest-batch bracket against the predicted boundary."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import polars as pl

from memsweep.columns import Array, Columns
from memsweep.errors import ConfigError
from memsweep.formulas import Formula, get_formula
from memsweep.plan.grid import Grid, largest_fitting
from memsweep.plan.spec import PlanSpec
from memsweep.specs import Hardware, JobSpec

CONFIG_KEYS = ("model", "workload", "seq", "batch", "dtype", "precision", "optimizer", "optimizer_impl",
               "recompute", "attention", "tp", "pp", "dp", "zero", "sequence_parallel", "hardware",
               "gen_tokens", "lora_rank")
VERDICTS = {(True, True): "fits, ran", (True, False): "fits, but oom (optimistic)",
            (False, True): "does not fit, but ran (conservative)", (False, False): "does not fit, oom"}


@dataclass(frozen=True)
class Comparison:
    """Predicted fits (the plan's rule) against measured cuda ok / oom."""

    rows: pl.DataFrame       # one per measured configuration
    confusion: pl.DataFrame  # predicted (fits / does not fit) x measured (ok / oom) counts
    boundary: pl.DataFrame   # per configuration without batch: measured bracket vs predicted max batch
    skipped: pl.DataFrame    # measured rows the planner could not rebuild, with the reason


def compare_measured(results: pl.DataFrame, spec: PlanSpec) -> Comparison:
    """For every measured cuda row (status ok or oom), rebuild its JobSpec, evaluate the plan's
    formula on all of them at once, and compare `total <= capacity` with what happened."""
    from memsweep.fit import spec_of_row

    needed = ["measure_backend", "status", "measured_peak_bytes", "model", "workload", "seq", "batch",
              "dtype", "precision", "recompute", "hardware"]
    missing = [c for c in needed if c not in results.columns]
    if missing:
        raise ConfigError("results", spec.results or "table", f"a results table (missing column {missing[0]})")
    measured = results.filter((pl.col("measure_backend") == "cuda") & pl.col("status").is_in(["ok", "oom"]))
    keys = [k for k in CONFIG_KEYS if k in measured.columns]
    # One row per job: a sweep writes a job's measurement on each formula's row.
    measured = measured.unique(subset=keys, keep="first", maintain_order=True)
    jobs, kept, skipped = [], [], []
    for i, row in enumerate(measured.iter_rows(named=True)):
        try:
            jobs.append(spec_of_row(row))
            kept.append(i)
        except Exception as exc:  # a row the planner cannot rebuild is listed, never fatal
            skipped.append({"model": row.get("model"), "seq": row.get("seq"), "batch": row.get("batch"),
                            "hardware": row.get("hardware"), "reason": str(exc).splitlines()[0]})
    known = {h.name: h for h in spec.hardware_specs()}
    formula = get_formula(spec.formula, key="formula")
    rows = (measured.with_row_index("_i").filter(pl.col("_i").is_in(kept))
            .select("model", "workload", "seq", "batch", "dtype", "precision", "recompute", "hardware",
                    pl.col("status").alias("measured_status"), "measured_peak_bytes"))
    total = formula(Columns.from_specs(jobs)).total if jobs else np.zeros(0)
    capacity = np.array([spec.capacity_bytes(known.get(j.hardware.name) or _plan_hardware(j.hardware, spec))
                         for j in jobs], dtype=np.float64)
    predicted = total <= capacity
    ran = (rows["measured_status"] == "ok").to_numpy().astype(bool)
    fits, ok = pl.col("predicted_fits"), pl.col("measured_fits")
    verdict = pl.lit(None, dtype=pl.String)
    for (p, r), text in VERDICTS.items():
        verdict = pl.when((fits == p) & (ok == r)).then(pl.lit(text)).otherwise(verdict)
    table = rows.with_columns(
        pl.Series("predicted_total_bytes", np.round(total), dtype=pl.Float64).cast(pl.Int64),
        pl.Series("capacity_bytes", np.floor(capacity), dtype=pl.Float64).cast(pl.Int64),
        pl.Series("predicted_fits", predicted, dtype=pl.Boolean),
        pl.Series("measured_fits", ran, dtype=pl.Boolean),
    ).with_columns(agree=fits == ok, verdict=verdict)
    confusion = pl.DataFrame({
        "predicted": ["fits", "does not fit"],
        "measured_ok": [int((predicted & ran).sum()), int((~predicted & ran).sum())],
        "measured_oom": [int((predicted & ~ran).sum()), int((~predicted & ~ran).sum())],
    })
    boundary = _boundary(table, jobs, formula, capacity, spec.max_batch)
    skipped_df = pl.DataFrame(skipped, schema={"model": pl.String, "seq": pl.Int64, "batch": pl.Int64,
                                               "hardware": pl.String, "reason": pl.String})
    return Comparison(table, confusion, boundary, skipped_df)


def _plan_hardware(hw: Hardware, spec: PlanSpec) -> Hardware:
    """A measured row's hardware that is not in the plan: its preset, with the plan's reserve."""
    return hw if spec.reserved_mib is None else replace(hw, reserved_mib=spec.reserved_mib)


def _boundary(table: pl.DataFrame, jobs: list[JobSpec], formula: Formula, capacity: Array,
              max_batch: int) -> pl.DataFrame:
    """Group measured rows by everything but batch: the measured bracket (largest ok batch,
    smallest oom batch) against the predicted largest batch, found by the same search."""
    by = ["model", "workload", "seq", "dtype", "precision", "recompute", "hardware"]
    if table.height == 0:
        return pl.DataFrame(schema={**{k: table.schema[k] for k in by}, "measured_max_ok": pl.Int64,
                                    "measured_min_oom": pl.Int64, "predicted_max_batch": pl.Int64,
                                    "predicted_boundary": pl.String})
    t = table.with_row_index("row")
    groups = (t.group_by(by, maintain_order=True)
              .agg(pl.col("row").first(),
                   pl.col("batch").filter(pl.col("measured_fits")).max().alias("measured_max_ok"),
                   pl.col("batch").filter(~pl.col("measured_fits")).min().alias("measured_min_oom")))
    first = groups["row"].to_numpy()
    base = Columns.from_specs([jobs[i] for i in first])
    grid = Grid(base, np.arange(len(first)), {"batch": np.ones(len(first))})
    best = largest_fitting(formula, grid, "batch", np.full(len(first), max_batch), capacity[first])
    g = groups.with_columns(predicted_max_batch=pl.Series(best.astype(np.int64))).drop("row")
    pred, ok, oom = pl.col("predicted_max_batch"), pl.col("measured_max_ok"), pl.col("measured_min_oom")
    where = (pl.when(ok.is_not_null() & (pred < ok)).then(pl.lit("below measured (conservative)"))
             .when(oom.is_not_null() & (pred >= oom)).then(pl.lit("above measured (optimistic)"))
             .otherwise(pl.lit("within measured bracket")))
    return g.with_columns(predicted_boundary=where)
