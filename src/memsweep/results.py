"""The result schema (declared once), atomic part files, and collection into `results.parquet`.

Each job writes `rows.parquet` into its own job directory (temp file + `os.replace`, so a crash
never leaves a half-written part that looks finished). Collection globs the parts under a sweep
directory, aligns every part to the schema (older parts missing newer columns get nulls), and
writes `results.parquet` atomically too. It never depends on Hydra: `scripts/collect.py` runs the
same function on any sweep directory, finished or interrupted.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl

from memsweep.units import GIB, MIB

SCHEMA_VERSION = 4
PART_NAME = "rows.parquet"
RESULTS_NAME = "results.parquet"

# Column names are a contract users script against: add columns at the end, never rename.
SCHEMA: dict[str, pl.DataType] = {
    "sweep_id": pl.String(),
    "job_id": pl.String(),
    "model": pl.String(),
    "family": pl.String(),
    "params": pl.Int64(),
    "seq": pl.Int64(),
    "batch": pl.Int64(),
    "dtype": pl.String(),
    "precision": pl.String(),
    "workload": pl.String(),
    "optimizer": pl.String(),
    "recompute": pl.String(),
    "attention": pl.String(),
    "tp": pl.Int64(),
    "pp": pl.Int64(),
    "dp": pl.Int64(),
    "zero": pl.Int64(),
    "hardware": pl.String(),
    "hardware_bytes": pl.Int64(),
    "formula": pl.String(),
    "weights_bytes": pl.Int64(),
    "gradients_bytes": pl.Int64(),
    "optimizer_bytes": pl.Int64(),
    "activations_bytes": pl.Int64(),
    "logits_bytes": pl.Int64(),
    "kv_cache_bytes": pl.Int64(),
    "overhead_bytes": pl.Int64(),
    "total_bytes": pl.Int64(),
    "fits": pl.Boolean(),
    "status": pl.String(),
    "error": pl.String(),
    "measure_backend": pl.String(),
    "measured_peak_bytes": pl.Int64(),
    "measured_reserved_bytes": pl.Int64(),
    "step_time_s": pl.Float64(),
    # --- beyond the first contract ---
    "job_num": pl.Int64(),
    "total_gib": pl.Float64(),
    "gen_tokens": pl.Int64(),
    "lora_rank": pl.Int64(),
    "optimizer_impl": pl.String(),
    "sequence_parallel": pl.Boolean(),
    "trainable_params": pl.Int64(),
    "schema_version": pl.Int64(),
    # --- schema 2: measurement (issue 3) ---
    "tokens_per_s": pl.Float64(),
    "measured_weights_bytes": pl.Int64(),
    "measured_gradients_bytes": pl.Int64(),
    "measured_optimizer_bytes": pl.Int64(),
    "measured_activations_bytes": pl.Int64(),
    "measured_kv_cache_bytes": pl.Int64(),
    "measured_forward_peak_bytes": pl.Int64(),
    "measured_backward_peak_bytes": pl.Int64(),
    "measured_optimizer_peak_bytes": pl.Int64(),
    "measured_prefill_peak_bytes": pl.Int64(),
    "measured_decode_peak_bytes": pl.Int64(),
    "device": pl.String(),
    "torch_version": pl.String(),
    "measure_wall_s": pl.Float64(),
    # --- schema 3: the whole resolved job (JobSpec.to_dict as JSON), for refitting (issue 5) ---
    "spec_json": pl.String(),
    # --- schema 4: any architecture (issue 10) ---
    "active_params": pl.Int64(),   # parameters one token runs through (MoE: top-k experts, not all)
    "ep": pl.Int64(),              # expert parallelism
}

_PY_TYPES: dict[type, tuple[type, ...]] = {
    pl.String: (str,),
    pl.Int64: (int,),
    pl.Float64: (float, int),
    pl.Boolean: (bool,),
}


def coerce_row(values: Mapping[str, Any]) -> dict[str, Any]:
    """Keep each known column whose value has the column's type; anything else becomes null.

    Error rows are built from raw, possibly wrong, config values (`seq="abc"`); those must not
    break the part file, and the error message already carries the bad value.
    """
    row: dict[str, Any] = {}
    for name, dtype in SCHEMA.items():
        v = values.get(name)
        ok = _PY_TYPES[type(dtype)]
        if v is not None and isinstance(v, ok) and not (isinstance(v, bool) and bool not in ok):
            row[name] = v
        else:
            row[name] = None
    row["schema_version"] = SCHEMA_VERSION
    return row


def frame(rows: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame([coerce_row(r) for r in rows], schema=SCHEMA, orient="row")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write through `write(fh)` to a temp file in the same directory, fsync, give it the mode a
    plain open() would (mkstemp makes 0600), then rename it over `path`: readers see the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> Path:
    return write_atomic(path, df.write_parquet)


def write_text_atomic(text: str, path: Path) -> Path:
    return write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def write_part(rows: Iterable[Mapping[str, Any]], job_dir: Path) -> Path:
    return write_parquet_atomic(frame(rows), Path(job_dir) / PART_NAME)


class SchemaConflict(ValueError):
    """A part whose column types contradict the schema (not merely older: wrong)."""


def _compatible(found: pl.DataType, wanted: pl.DataType) -> bool:
    if found == wanted or found == pl.Null:
        return True
    numeric = (found.is_integer() or found.is_float()) and (wanted.is_integer() or wanted.is_float())
    return numeric and not (found.is_float() and wanted.is_integer())


def align(df: pl.DataFrame) -> pl.DataFrame:
    """Bring a part to the current schema: columns an older schema lacked become nulls, columns
    come in schema order; a column whose type conflicts raises `SchemaConflict`."""
    for name, wanted in SCHEMA.items():
        if name in df.columns and not _compatible(df.schema[name], wanted):
            raise SchemaConflict(f"column {name!r} is {df.schema[name]}, the schema says {wanted}")
    missing = [pl.lit(None, dtype=t).alias(n) for n, t in SCHEMA.items() if n not in df.columns]
    df = df.with_columns(missing) if missing else df
    return df.select([pl.col(n).cast(t, strict=True) for n, t in SCHEMA.items()])


@dataclass
class Collected:
    table: pl.DataFrame
    path: Path | None
    parts: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    jobs_without_rows: list[Path] = field(default_factory=list)


def find_parts(root: Path) -> list[Path]:
    """Every finished part under `root` (temp files start with '.' and never match)."""
    return sorted(Path(root).rglob(PART_NAME))


def job_dirs(root: Path) -> list[Path]:
    """Hydra job directories: each holds a `.hydra/` folder written when the job starts."""
    return sorted(p.parent for p in Path(root).rglob(".hydra") if p.is_dir())


def _read_parts(parts: list[Path]) -> tuple[list[pl.DataFrame], list[tuple[Path, str]], set[Path]]:
    """Every part at once when they agree (one multi-file read, the common case); otherwise part
    by part, so one corrupt or conflicting part is reported and the rest still land."""
    if parts:
        try:
            return [align(pl.read_parquet(parts))], [], {p.parent for p in parts}
        except Exception:  # a bad part, or parts of different schema versions: go one by one
            pass
    frames, skipped, with_rows = [], [], set()
    for part in parts:
        try:
            frames.append(align(pl.read_parquet(part)))
            with_rows.add(part.parent)
        except SchemaConflict as exc:  # refused, with the reason
            skipped.append((part, f"type conflict: {exc}"))
        except Exception as exc:  # a corrupt or truncated part is reported, never fatal
            skipped.append((part, f"unreadable: {type(exc).__name__}: {exc}".splitlines()[0]))
    return frames, skipped, with_rows


def collect(root: Path, write: bool = True) -> Collected:
    """Merge every part under `root` into one table and (atomically) `root/results.parquet`."""
    root = Path(root)
    parts = find_parts(root)
    frames, skipped, with_rows = _read_parts(parts)
    table = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=SCHEMA)
    # Within a job, rows keep the order the job wrote them in (the formula registry's order).
    table = table.sort(["job_num", "job_id"], nulls_last=True, maintain_order=True)
    missing = [d for d in job_dirs(root) if d not in with_rows and d != root]
    path = write_parquet_atomic(table, root / RESULTS_NAME) if write else None
    return Collected(table=table, path=path, parts=len(parts), skipped=skipped,
                     jobs_without_rows=missing)


# --- the printed summary ------------------------------------------------------------------

PIVOT_KEYS = ("batch", "workload", "precision", "optimizer", "recompute", "attention", "hardware",
              "tp", "pp", "dp", "zero")


def summary_model(table: pl.DataFrame, preferred: str = "llama2-7b") -> str | None:
    models = table.filter(pl.col("status") == "ok")["model"].unique(maintain_order=True).to_list()
    if not models:
        return None
    return preferred if preferred in models else models[0]


def pivot_memory(table: pl.DataFrame, model: str) -> tuple[pl.DataFrame, str]:
    """Total memory per formula (one column each, plus the measured peak when there is one);
    rows seq x dtype plus any other swept key. GiB, or MiB when everything is under 1 GiB."""
    ok = table.filter((pl.col("status") == "ok") & (pl.col("model") == model))
    swept = [k for k in PIVOT_KEYS if ok[k].n_unique() > 1]
    index = ["seq", "dtype", *swept]
    largest = max(ok["total_bytes"].max() or 0, ok["measured_peak_bytes"].max() or 0)
    unit, scale = ("GiB", GIB) if largest >= GIB else ("MiB", MIB)
    formulas = ok["formula"].unique(maintain_order=True).to_list()
    wide = ok.with_columns(value=pl.col("total_bytes") / scale).pivot(
        on="formula", index=index, values="value", aggregate_function="first")
    wide = wide.select([*index, *formulas])
    if ok["measured_peak_bytes"].null_count() < ok.height:
        backend = ok["measure_backend"].drop_nulls().first()
        measured = ok.group_by(index, maintain_order=True).agg(
            (pl.col("measured_peak_bytes").first() / scale).alias(f"measured ({backend})"))
        wide = wide.join(measured, on=index, how="left", nulls_equal=True)
    return wide.sort(index), unit


def summarize(collected: Collected, out=sys.stdout) -> None:
    t = collected.table
    print(f"results: {collected.path}", file=out)
    counts = t.group_by("status").len().sort("status")
    status = ", ".join(f"{s}={n}" for s, n in counts.iter_rows())
    jobs = t["job_id"].n_unique()
    print(f"rows: {t.height} ({jobs} jobs x formulas; {status or 'no rows'})", file=out)
    for part, why in collected.skipped:
        print(f"skipped part: {part}: {why}", file=out)
    if collected.jobs_without_rows:
        print(f"jobs without rows (interrupted?): {len(collected.jobs_without_rows)}", file=out)
    errors = t.filter(pl.col("status") != "ok").unique("job_id", maintain_order=True)
    for row in errors.head(5).iter_rows(named=True):
        print(f"  job {row['job_num']}: {row['status']}: {row['error']}", file=out)
    model = summary_model(t)
    if model is None:
        return
    pivot, unit = pivot_memory(t, model)
    print(f"total {unit} per GPU, model={model}:", file=out)
    print(markdown_table(pivot, float_precision=2), file=out)


def markdown_table(df: pl.DataFrame, float_precision: int = 3) -> str:
    """A DataFrame as a Markdown table (no dtypes, no shape, nothing elided)."""
    with pl.Config(tbl_formatting="ASCII_MARKDOWN", tbl_hide_column_data_types=True,
                   tbl_hide_dataframe_shape=True, tbl_rows=-1, tbl_cols=-1,
                   float_precision=float_precision, tbl_width_chars=1000, fmt_str_lengths=100):
        return str(df)
