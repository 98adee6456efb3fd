"""Error of every formula against measurement: signed and absolute relative error, summaries.

Pure polars over the result schema: rows with both an estimate (`total_bytes`) and a measured
peak (`measured_peak_bytes`) get `error_pct` = 100 * (estimate - measured) / measured.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from memsweep.columns import Columns
from memsweep.errors import ConfigError
from memsweep.specs import Hardware, JobSpec, OptimizerSpec, Parallel

ERROR = "error_pct"


def with_errors(table: pl.DataFrame) -> pl.DataFrame:
    """Measured rows with their relative error; rows without a measurement are dropped here
    (callers report them separately: see `unmeasured`)."""
    measured = table.filter(pl.col("status") == "ok", pl.col("measured_peak_bytes") > 0,
                            pl.col("total_bytes").is_not_null())
    return measured.with_columns(
        (100.0 * (pl.col("total_bytes") - pl.col("measured_peak_bytes"))
         / pl.col("measured_peak_bytes")).alias(ERROR))


def unmeasured(table: pl.DataFrame) -> pl.DataFrame:
    """Jobs whose measurement did not produce a peak (oom, skipped, error), one row per job."""
    return (table.filter(pl.col("measured_peak_bytes").is_null())
            .unique("job_id", maintain_order=True)
            .select("job_id", "model", "workload", "seq", "batch", "dtype", "precision", "recompute",
                    "status", "error"))


def describe_config(columns: Sequence[str] = ("model", "workload", "seq", "batch", "dtype",
                                              "precision", "recompute")) -> pl.Expr:
    """One readable string per row: 'llama2-7b train seq=2048 batch=1 bf16/mixed recompute=none'."""
    parts = []
    for c in columns:
        expr = pl.col(c).cast(pl.String)
        parts.append(expr if c in ("model", "workload", "dtype", "precision") else pl.lit(f"{c}=") + expr)
    return pl.concat_str(parts, separator=" ").alias("config")


def error_summary(errors: pl.DataFrame, by: Sequence[str] = ("formula",)) -> pl.DataFrame:
    """count, mean signed error, median |error|, p90, worst |error| and where the worst is."""
    e = errors.with_columns(pl.col(ERROR).abs().alias("abs_err"), describe_config())
    return (e.group_by(list(by), maintain_order=True)
            .agg(pl.len().alias("count"),
                 pl.col(ERROR).mean().alias("mean_signed_pct"),
                 pl.col("abs_err").mean().alias("mape_pct"),
                 pl.col("abs_err").median().alias("median_abs_pct"),
                 pl.col("abs_err").quantile(0.9, "linear").alias("p90_abs_pct"),
                 pl.col("abs_err").max().alias("worst_abs_pct"),
                 pl.col(ERROR).sort_by("abs_err").last().alias("worst_signed_pct"),
                 pl.col("config").sort_by("abs_err").last().alias("worst_config"))
            .sort(list(by)))


def worst(errors: pl.DataFrame, formula: str, n: int = 3) -> pl.DataFrame:
    e = errors.filter(pl.col("formula") == formula).with_columns(describe_config())
    return (e.sort(pl.col(ERROR).abs(), descending=True).head(n)
            .select("config", "total_bytes", "measured_peak_bytes", ERROR,
                    "measured_forward_peak_bytes", "measured_backward_peak_bytes",
                    "measured_optimizer_peak_bytes", "measured_prefill_peak_bytes"))


PHASES = ("forward", "backward", "optimizer", "prefill", "decode")
"""The phases whose peaks both a measurement (`measured_<phase>_peak_bytes`) and `detailed`
(`<phase>_peak_bytes`, schema 10) report."""


def phase_errors(table: pl.DataFrame) -> pl.DataFrame:
    """One row per measured job x phase where both peaks exist (detailed's rows): the estimated and
    measured peak of that phase and their signed % error. A total that matches while the forward is
    wrong shows here (issue 25)."""
    ok = table.filter(pl.col("status") == "ok")
    parts = []
    for phase in PHASES:
        est, got = f"{phase}_peak_bytes", f"measured_{phase}_peak_bytes"
        if est not in ok.columns or got not in ok.columns:
            continue
        rows = ok.filter(pl.col(est).is_not_null(), pl.col(got) > 0)
        parts.append(rows.select("job_id", "formula", "model", "workload", "seq", "batch", "dtype", "precision",
                                 "recompute", pl.lit(phase).alias("phase"), pl.col(est).alias("estimated_bytes"),
                                 pl.col(got).alias("measured_bytes"))
                     .with_columns((100.0 * (pl.col("estimated_bytes") - pl.col("measured_bytes"))
                                    / pl.col("measured_bytes")).alias(ERROR)))
    return pl.concat(parts, how="vertical_relaxed") if parts else pl.DataFrame()


# --- loading measured sweeps ------------------------------------------------------------------

SEQ_BUCKETS = ((512, "<=512"), (2048, "513-2048"), (8192, "2049-8192"))
GROUPINGS = ("model", "precision", "workload", "recompute", "seq_bucket")


def load_tables(paths: Sequence[Path | str]) -> pl.DataFrame:
    """Sweep directories (their results.parquet, or their parts) or Parquet files, concatenated.
    A directory memsweep did not write adds nothing (the caller says no rows were measured); one
    holding several sweeps is a ConfigError: each is its own PATH (several PATHs are merged)."""
    from memsweep.results import RESULTS_NAME, SCHEMA, NotASweep, SeveralSweeps, align, collect

    tables = []
    for p in map(Path, paths):
        if p.is_dir():
            if (p / RESULTS_NAME).is_file():
                t = pl.read_parquet(p / RESULTS_NAME)
            else:
                try:
                    t = collect(p, write=False, merge=False).table
                except NotASweep:  # never walked
                    t = pl.DataFrame(schema=SCHEMA)
                except SeveralSweeps as exc:
                    raise ConfigError("PATH", str(p), f"one sweep per PATH (it {exc.why}: give each as a PATH, "
                                      f"or `memsweep collect --merge {p}` first)") from None
            tables.append(align(t))
        elif p.is_file():
            try:
                tables.append(align(pl.read_parquet(p)))
            except Exception as exc:
                raise ConfigError("PATH", str(p), f"a sweep directory or a results Parquet file "
                                  f"({type(exc).__name__})") from None
        else:
            raise ConfigError("PATH", str(p), "a sweep directory or a results Parquet file")
    return pl.concat(tables, how="vertical") if tables else pl.DataFrame()


def with_seq_bucket(df: pl.DataFrame) -> pl.DataFrame:
    expr = pl.lit(f">{SEQ_BUCKETS[-1][0]}")
    for limit, label in reversed(SEQ_BUCKETS):
        expr = pl.when(pl.col("seq") <= limit).then(pl.lit(label)).otherwise(expr)
    return df.with_columns(expr.alias("seq_bucket"))


def spec_of_row(row: dict) -> JobSpec:
    """The job's spec: exact from `spec_json`; for rows written before it existed, rebuilt from
    the preset names and the recorded columns."""
    if row.get("spec_json"):
        return JobSpec.from_dict(json.loads(row["spec_json"]))
    from memsweep.presets import job_spec, load_preset, workload_spec

    wl = workload_spec(row["workload"], gen_tokens=row["gen_tokens"] or 0,
                       **({"lora_rank": row["lora_rank"]} if row["lora_rank"] else {}))
    return job_spec(
        row["model"], wl=wl, optimizer=OptimizerSpec(row["optimizer"], row["optimizer_impl"] or "foreach"),
        parallel=Parallel("recorded", tp=row["tp"], pp=row["pp"], dp=row["dp"], zero=row["zero"],
                          sequence_parallel=bool(row["sequence_parallel"])),
        hardware=Hardware(**load_preset("hardware", row["hardware"])), seq=row["seq"],
        batch=row["batch"], dtype=row["dtype"], precision=row["precision"],
        recompute=row["recompute"], attention=row["attention"])


def measured_jobs(table: pl.DataFrame) -> tuple[pl.DataFrame, Columns, np.ndarray]:
    """One row per measured job (ok status, a peak), its Columns and its measured peak bytes."""
    jobs = (table.filter(pl.col("status") == "ok", pl.col("measured_peak_bytes") > 0)
            .unique("job_id", keep="first", maintain_order=True))
    return jobs, Columns.from_specs(specs_of_rows(jobs)), jobs["measured_peak_bytes"].to_numpy().astype(float)


def specs_of_rows(jobs: pl.DataFrame) -> list[JobSpec]:
    """Every row's JobSpec (spec_of_row); a row that is not a memsweep job is a one-line
    ConfigError naming the row and the column (a hand-edited or foreign table)."""
    specs = []
    for r in jobs.iter_rows(named=True):
        try:
            specs.append(spec_of_row(r))
        except Exception as exc:
            raw = r.get("spec_json") or ""
            raise ConfigError("spec_json", raw[:60] + ("..." if len(raw) > 60 else ""),
                              f"the JSON of a memsweep job spec (job_id {r.get('job_id')}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return specs


def error_tables(errors: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The overall table and one per grouping key, every formula in each."""
    e = with_seq_bucket(errors)
    out = {"overall": error_summary(e, ["formula"])}
    for key in GROUPINGS:
        out[key] = error_summary(e, ["formula", key])
    return out
