"""Error of every formula against measurement: signed and absolute relative error, summaries.

Pure polars over the result schema: rows with both an estimate (`total_bytes`) and a measured
peak (`measured_peak_bytes`) get `error_pct` = 100 * (estimate - measured) / measured.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

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
