"""The result schema (declared once), atomic part files, and collection into `results.parquet`.

Each job writes `rows.parquet` into its own job directory (temp file + `os.replace`, so a crash
never leaves a half-written part that looks finished). Collection globs the parts under a sweep
directory, aligns every part to the schema (older parts missing newer columns get nulls), and
writes `results.parquet` atomically too. It never depends on Hydra: `scripts/collect.py` runs the
same function on any sweep directory, finished or interrupted.
"""

from __future__ import annotations

import io
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl

from memsweep.units import GIB, MIB

SCHEMA_VERSION = 5
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
    # --- schema 5: the techniques of real stacks (issue 13) ---
    "quant": pl.String(),          # the frozen weights' format: none, nf4, fp4, int8, gptq, awq
    "loss_chunks": pl.Int64(),     # torchtune's chunked loss (1: one cross_entropy)
    "fused_loss": pl.Boolean(),    # Liger's fused linear cross-entropy
    "in_backward": pl.Boolean(),   # optimizer stepped inside the backward
    "kv_dtype": pl.String(),       # the KV cache's element type (auto: the compute dtype)
    "kv_bytes_per_token": pl.Int64(),    # inference / serve: KV cache bytes per token, all layers
    "kv_tokens": pl.Int64(),             # serve: tokens the paged KV cache holds (vLLM's "GPU KV cache size")
    "max_concurrent_seqs": pl.Int64(),   # serve: sequences of `seq` tokens the cache holds at once
    "capacity_bytes": pl.Int64(),        # what `fits` compares the total with (serve: gpu_util x memory - reserve)
    "cpu_bytes": pl.Int64(),             # training: CPU RAM a rank needs for what it offloads
    "offload": pl.String(),              # none, or what lives in CPU RAM: optimizer, params, activations
    "grad_accum": pl.Int64(),            # micro-batches per optimizer step
    "mixed_policy": pl.String(),         # mixed precision: autocast | param_dtype (null when not mixed)
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
        if isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v < 2**63:
            row[name] = None  # what int64 cannot hold (the row's error says why)
        elif v is not None and isinstance(v, ok) and not (isinstance(v, bool) and bool not in ok):
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


class OutputError(OSError):
    """A file memsweep must write could not be (read-only directory, disk full, ...): the message
    names the path and the cause on one line."""


_HOST = socket.gethostname().replace("~", "-")


def _temp_prefix(path: Path) -> str:
    """`.NAME~HOST~PID~`: whose temp file it is, so a later collect can tell a killed writer's
    leftovers (its process is gone) from a write in flight."""
    return f".{path.name}~{_HOST}~{os.getpid()}~"


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write through `write(fh)` to a temp file in the same directory, fsync, give it the mode a
    plain open() would (mkstemp makes 0600), then rename it over `path`: readers see the old
    file or the new one, never half of one. An OS failure is an `OutputError` naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


STALE_AFTER_S = 3600.0
"""A temp file of another host is left alone for this long (its writer may still be running)."""


def clean_stale_temps(root: Path) -> list[Path]:
    """Delete temp files of killed writes under `root`: this host's whose process is gone, any
    other host's older than STALE_AFTER_S, and unnamed ones (older memsweep) as old as that."""
    removed = []
    for tmp in Path(root).rglob(".*.tmp"):
        parts = tmp.name.split("~")
        try:
            if len(parts) == 4 and parts[1] == _HOST:
                stale = not _alive(int(parts[2]))
            else:
                stale = time.time() - tmp.stat().st_mtime > STALE_AFTER_S
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except (OSError, ValueError):  # gone meanwhile, or not ours to read: leave it
            continue
    return removed


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> Path:
    """Encoded in memory first: a failing disk is then a plain OSError of the file write (polars
    writing straight to a full disk raises an opaque ComputeError)."""
    buf = io.BytesIO()
    df.write_parquet(buf)
    return write_atomic(path, lambda fh: fh.write(buf.getbuffer()))


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
    kept: str | None = None
    """Why an existing results.parquet was kept rather than replaced by a table with less in it."""
    cleaned: int = 0
    """Temp files of killed writes removed."""


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


def _ok_keys(table: pl.DataFrame) -> set[tuple]:
    ok = table.filter(pl.col("status") == "ok")
    return set(zip(ok["job_id"].to_list(), ok["formula"].to_list()))


def would_lose(old_path: Path, table: pl.DataFrame) -> str | None:
    """Why writing `table` over `old_path` would lose rows (a job, or a job's ok row, the old
    table has and the new one lacks), or None. An unreadable old file holds nothing to keep."""
    if not old_path.is_file():
        return None
    try:
        old = pl.read_parquet(old_path, columns=["job_id", "formula", "status"])
    except Exception:
        return None
    lost_jobs = set(old["job_id"].drop_nulls()) - set(table["job_id"].drop_nulls())
    lost_rows = _ok_keys(old) - _ok_keys(table)
    if not lost_jobs and not lost_rows:
        return None
    what = f"{len(lost_jobs)} of its jobs" if lost_jobs else f"{len(lost_rows)} of its ok rows"
    return (f"kept {old_path} ({old.height} rows): the parts hold {table.height} rows and lack {what}; "
            f"nothing written (move it away to rebuild it from the parts)")


def collect(root: Path, write: bool = True) -> Collected:
    """Merge every part under `root` into one table and (atomically) `root/results.parquet`.
    An existing results.parquet is never replaced by a table that lacks any of its jobs or ok
    rows: it is kept, and `kept` says why. Temp files of killed writes are removed first."""
    root = Path(root)
    cleaned = len(clean_stale_temps(root)) if write else 0
    parts = find_parts(root)
    frames, skipped, with_rows = _read_parts(parts)
    table = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=SCHEMA)
    # Within a job, rows keep the order the job wrote them in (the formula registry's order).
    table = table.sort(["job_num", "job_id"], nulls_last=True, maintain_order=True)
    missing = [d for d in job_dirs(root) if d not in with_rows and d != root]
    path, kept = None, None
    if write:
        target = root / RESULTS_NAME
        kept = would_lose(target, table)
        if kept:
            path, table = target, align(pl.read_parquet(target))
        else:
            path = write_parquet_atomic(table, target)
    return Collected(table=table, path=path, parts=len(parts), skipped=skipped,
                     jobs_without_rows=missing, kept=kept, cleaned=cleaned)


# --- the printed summary ------------------------------------------------------------------

PIVOT_KEYS = ("batch", "workload", "precision", "optimizer", "recompute", "attention", "hardware",
              "tp", "pp", "dp", "zero", "quant", "loss_chunks", "fused_loss", "in_backward", "kv_dtype",
              "offload", "grad_accum", "mixed_policy")


SUMMARY_MODELS = 4
"""Models the end-of-sweep summary prints a table for (the rest are in results.parquet)."""


def shown(table: pl.DataFrame) -> pl.DataFrame:
    """The rows a summary shows: ok ones, and measured rows of a model no formula models
    (status unsupported: a measured column, empty formula columns)."""
    return table.filter((pl.col("status") == "ok")
                        | ((pl.col("status") == "unsupported") & pl.col("measured_peak_bytes").is_not_null()))


def summary_model(table: pl.DataFrame, preferred: str = "llama2-7b") -> str | None:
    models = shown(table)["model"].unique(maintain_order=True).to_list()
    if not models:
        return None
    return preferred if preferred in models else models[0]


def pivot_memory(table: pl.DataFrame, model: str) -> tuple[pl.DataFrame, str]:
    """Total memory per formula (one column each, plus the measured peak when there is one);
    rows seq x dtype plus any other swept key. GiB, or MiB when everything is under 1 GiB."""
    ok = shown(table).filter(pl.col("model") == model)
    swept = [k for k in PIVOT_KEYS if ok[k].n_unique() > 1]
    index = ["seq", "dtype", *swept]
    largest = max(ok["total_bytes"].max() or 0, ok["measured_peak_bytes"].max() or 0)
    unit, scale = ("GiB", GIB) if largest >= GIB else ("MiB", MIB)
    # formulas with an estimate here (none has one for a model no formula models)
    formulas = ok.filter(pl.col("total_bytes").is_not_null())["formula"].unique(maintain_order=True).to_list()
    wide = ok.with_columns(value=pl.col("total_bytes") / scale).pivot(
        on="formula", index=index, values="value", aggregate_function="first")
    wide = wide.select([*index, *formulas])
    if ok["measured_peak_bytes"].null_count() < ok.height:
        backend = ok["measure_backend"].drop_nulls().first()
        measured = ok.group_by(index, maintain_order=True).agg(
            (pl.col("measured_peak_bytes").first() / scale).alias(f"measured ({backend})"))
        wide = wide.join(measured, on=index, how="left", nulls_equal=True)
    served = ok.filter(pl.col("max_concurrent_seqs").is_not_null())
    if served.height:  # a serving engine's answer: how many sequences of `seq` tokens its cache holds
        engine = served.group_by(index, maintain_order=True).agg(
            pl.col("kv_tokens").first(), pl.col("max_concurrent_seqs").first().alias("concurrent seqs"))
        wide = wide.join(engine, on=index, how="left", nulls_equal=True)
    return wide.sort(index), unit


def summarize(collected: Collected, out=sys.stdout) -> None:
    t = collected.table
    print(f"results: {collected.path}", file=out)
    if collected.kept:
        print(f"warning: {collected.kept}", file=out)
    if collected.cleaned:
        print(f"removed {collected.cleaned} temp file(s) of killed writes", file=out)
    counts = t.group_by("status").len().sort("status")
    status = ", ".join(f"{s}={n}" for s, n in counts.iter_rows())
    jobs = t["job_id"].n_unique()
    print(f"rows: {t.height} ({jobs} jobs x formulas; {status or 'no rows'})", file=out)
    for part, why in collected.skipped:
        print(f"skipped part: {part}: {why}", file=out)
    if collected.jobs_without_rows:
        print(f"jobs without rows (interrupted?): {len(collected.jobs_without_rows)}", file=out)
    unsupported = t.filter(pl.col("status") == "unsupported")
    unmodelled = unsupported.filter(pl.col("family") == "hf").unique("job_id", maintain_order=True)
    if unmodelled.height:
        models = ", ".join(unmodelled["model"].unique(maintain_order=True).to_list())
        print(f"  {unmodelled.height} job(s) of models no formula models ({models}): measured only", file=out)
    techniques = unsupported.filter(pl.col("family") != "hf")
    if techniques.height:
        names = ", ".join(techniques["formula"].unique(maintain_order=True).to_list())
        print(f"  {techniques.height} row(s) of {names}: a technique they do not model (detailed does; "
              "see the error column)", file=out)
    errors = t.filter(~pl.col("status").is_in(["ok", "unsupported"])).unique("job_id", maintain_order=True)
    for row in errors.head(5).iter_rows(named=True):
        print(f"  job {row['job_num']}: {row['status']}: {row['error']}", file=out)
    model = summary_model(t)
    if model is None:
        return
    others = [m for m in shown(t)["model"].unique(maintain_order=True).to_list() if m != model]
    for m in [model, *others[:SUMMARY_MODELS - 1]]:  # every model of a sweep, up to a screenful
        pivot, unit = pivot_memory(t, m)
        print(f"total {unit} per GPU, model={m}:", file=out)
        print(markdown_table(pivot, float_precision=2), file=out)
    if len(others) >= SUMMARY_MODELS:
        print(f"... and {len(others) - SUMMARY_MODELS + 1} more model(s): every row is in {collected.path}", file=out)


def markdown_table(df: pl.DataFrame, float_precision: int = 3) -> str:
    """A DataFrame as a Markdown table (no dtypes, no shape, nothing elided)."""
    with pl.Config(tbl_formatting="ASCII_MARKDOWN", tbl_hide_column_data_types=True,
                   tbl_hide_dataframe_shape=True, tbl_rows=-1, tbl_cols=-1,
                   float_precision=float_precision, tbl_width_chars=10000, fmt_str_lengths=1000):
        return str(df)
