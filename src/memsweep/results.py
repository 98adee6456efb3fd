"""The result schema (declared once), atomic part files, and collection into `results.parquet`.

Each job writes `rows.parquet` into its own job directory, or a batch of jobs into theirs
(`batch-<first>-<last>/`, the batched launcher's), through a temp file + `os.replace`, so a crash
never leaves a half-written part that looks finished. Collection globs the parts under a sweep
directory, aligns every part to the schema (older parts missing newer columns get nulls), and
writes `results.parquet` atomically too. It never depends on Hydra: `scripts/collect.py` runs the
same function on any sweep directory, finished or interrupted, and only there: a directory is
recognised by what a sweep leaves in it or right under it (`sweep_markers`), a part without
memsweep's columns is skipped, and the only files ever deleted are memsweep's own temp files of
killed writes, where memsweep writes them (`clean_stale_temps`).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
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

SCHEMA_VERSION = 12
PART_NAME = "rows.parquet"
RESULTS_NAME = "results.parquet"
BATCH_PREFIX = "batch-"
"""The batched launcher's directories: `batch-<first>-<last>/` holds one part for those job numbers."""
BATCH_RECORD = Path(".hydra") / "jobs.jsonl"
"""Beside a batch's part: one JSON line per job (job_num, job_id, overrides, the resolved config)."""

# Column names are a contract users script against: never rename or remove one; a new column
# goes at the end, or beside its kin (schema 7's timings; collect aligns parts by name).
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
    # --- schema 7: each phase timed on its own (issue 15; null when untimed: fake, older parts) ---
    "measured_forward_s": pl.Float64(),      # training: forward + loss, summed over micro-batches, per step
    "measured_backward_s": pl.Float64(),     # its backward (recomputation and in-backward optimizer steps included)
    "measured_optimizer_s": pl.Float64(),    # optimizer.step() + zero_grad() (~0 with optimizer.in_backward)
    "measured_prefill_s": pl.Float64(),      # inference: the cache's allocation and the prompt's forward
    "measured_decode_token_s": pl.Float64(), # inference: one decoded token (median over tokens)
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
    "capacity_bytes": pl.Int64(),        # what `fits` compares the total with: (memory - reserve) x (1 - margin) from
                                         #   schema 6 (before: memory - reserve); serve: at most gpu_util x memory - reserve
    "cpu_bytes": pl.Int64(),             # training: CPU RAM a rank needs for what it offloads
    "offload": pl.String(),              # none, or what lives in CPU RAM: optimizer, params, activations
    "grad_accum": pl.Int64(),            # micro-batches per optimizer step
    "mixed_policy": pl.String(),         # mixed precision: autocast | param_dtype (null when not mixed)
    # --- schema 6: one capacity definition; what set the peak (issue 14) ---
    "margin": pl.Float64(),              # share of usable memory kept free (capacity.py; the planner's too)
    "headroom_bytes": pl.Int64(),        # capacity_bytes - total_bytes: negative is the shortfall
    "peak_phase": pl.String(),           # detailed: the moment that set the peak (docs/formulas.md, "Moments")
    "optimizer_step_bytes": pl.Int64(),  # what optimizer.step() allocates beside the states (0 unless the step is the peak)
    "overrides": pl.String(),            # the job's command-line overrides (JSON list; Hydra's, without hydra.* and switches)
    # --- schema 8: the time model (issue 15; formulas/work.py and formulas/timing.py, per GPU) ---
    "flops": pl.Float64(),               # matmul FLOPs of one optimizer step (inference: one request), recompute included
    "bytes_moved": pl.Float64(),         # HBM bytes the step reads and writes at least
    "est_step_time_s": pl.Float64(),     # estimated step (inference: request) time, uncalibrated unless `time` says so
    "est_tokens_per_s": pl.Float64(),    # per GPU: training tokens; inference: generated tokens (prompt tokens without decode)
    "est_mfu": pl.Float64(),             # executed model FLOPs (no recompute; causal attention for sdpa) / time / peak
    "est_forward_s": pl.Float64(),       # the phases, as measured_* names them
    "est_backward_s": pl.Float64(),
    "est_optimizer_s": pl.Float64(),
    "est_prefill_s": pl.Float64(),
    "est_decode_token_s": pl.Float64(),
    "est_comm_s": pl.Float64(),          # exposed communication (critical-path collectives + unhidden data-parallel ones)
    # --- schema 9: the Hugging Face QLoRA recipe ---
    "kbit_prepare": pl.Boolean(),        # peft's prepare_model_for_kbit_training cast the base's other parameters to fp32
    # --- schema 10: detailed's peak per measured phase (issue 25), beside measured_<phase>_peak_bytes ---
    "forward_peak_bytes": pl.Int64(),    # detailed: the largest of its moments in each phase (formulas/detailed.py,
    "backward_peak_bytes": pl.Int64(),   #   phase_peaks); null for other formulas and where the job has no
    "optimizer_peak_bytes": pl.Int64(),  #   such phase
    "prefill_peak_bytes": pl.Int64(),
    "decode_peak_bytes": pl.Int64(),
    # --- schema 11: the SDPA kernel (issue 25; measure/sdpa.py): detailed's pick on the job's GPU, the measured run's ---
    "attn_kernel": pl.String(),          # cudnn | flash | efficient | math | eager (no SDPA); "+"-joined where layers differ
    "measured_attn_kernel": pl.String(), # fake: CUDA's pick on the job's GPU; cpu / cuda: the device's own
    # --- schema 12: the fused kernels a training step runs (issue 30; conf/kernels/, docs/kernels.md) ---
    "kernels": pl.String(),              # eager, or the fused ops "+"-joined (norm+mlp+rope+loss=fused)
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
    except (OverflowError, ValueError):  # no process can have that id
        return False
    return True


STALE_AFTER_S = 3600.0
"""A temp file of another host is left alone for this long (its writer may still be running)."""

GRIDS_NAME = "grids.json"
"""A sweep's (or run's) record of its grids, written by the app (app.cli.GRID_NAME)."""
SWEEP_FILES = ("multirun.yaml", GRIDS_NAME)
"""What a sweep or run leaves in its own directory: Hydra's multirun.yaml, memsweep's grids.json."""

_TEMP_NAME = re.compile(r"\.(?P<target>[^~/]+)~(?P<host>[^~/]+)~(?P<pid>[0-9]+)~[a-z0-9_]+\.tmp")
"""`_temp_prefix` + mkstemp's random part + `.tmp`: the only temp names memsweep ever writes."""
_GRID_SUBDIR = re.compile(r"grid-[0-9a-f]{8}")
"""A grid added with add=true (app.cli.grid_tag): its jobs and batches go one level down."""


def _is_job_dir(d: Path) -> bool:
    """A directory a job or a batch writes its part into: Hydra's `.hydra/` is in it, or it is
    named like one (`<job num>`, `batch-<first>-<last>`: a first write may have been killed)."""
    return d.name.isdigit() or d.name.startswith(BATCH_PREFIX) or (d / ".hydra").is_dir()


def _subdirs(d: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _write_places(root: Path) -> list[tuple[Path, frozenset[str]]]:
    """Where memsweep writes which files under `root` (a sweep, run, grid, job or batch directory),
    without walking anything else: root itself (results.parquet, grids.json, a run's or a job's
    part), its job and batch directories and those of its added grids (their part), and a batch's
    `.hydra/` (its record of the batch's jobs)."""
    part, record = frozenset({PART_NAME}), frozenset({BATCH_RECORD.name})
    places = [(root, frozenset({RESULTS_NAME, GRIDS_NAME, PART_NAME})), (root / BATCH_RECORD.parent, record)]
    level = _subdirs(root)
    level += [d for g in level if _GRID_SUBDIR.fullmatch(g.name) for d in _subdirs(g)]
    for d in level:
        if _is_job_dir(d):
            places += [(d, part), (d / BATCH_RECORD.parent, record)]
    return places


def clean_stale_temps(root: Path) -> list[Path]:
    """Delete temp files of killed writes: only memsweep's (`.NAME~HOST~PID~XXXXXXXX.tmp`), only
    of a file memsweep writes there (`_write_places`), and only stale ones: this host's whose
    process is gone, another host's older than STALE_AFTER_S. Anything else is left alone: a
    user's `.draft.tmp`, a temp in a folder memsweep does not write, an unnamed temp of an older
    memsweep (nothing proves it is ours)."""
    removed = []
    for where, targets in _write_places(Path(root)):
        for name in targets:
            try:
                found = sorted(where.glob(f".{glob.escape(name)}~*.tmp"))
            except OSError:
                continue
            for tmp in found:
                m = _TEMP_NAME.fullmatch(tmp.name)
                if m is None or m["target"] != name:
                    continue
                try:
                    if not tmp.is_file() or tmp.is_symlink():
                        continue
                    if m["host"] == _HOST:
                        stale = not _alive(int(m["pid"]))
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


def merge_part(rows: pl.DataFrame, job_dir: Path) -> Path:
    """Write `rows` (a frame of the schema) into a batch's part, atomically, keeping the rows the
    part holds of other jobs: a job that runs again replaces its rows (those of its id, and those
    of its job number, as a job's own part is replaced). An unreadable part holds nothing to keep."""
    part = Path(job_dir) / PART_NAME
    if part.is_file():
        try:
            old = align(pl.read_parquet(part))
        except Exception:  # corrupt, or of a conflicting schema: collect would skip it anyway
            old = None
        if old is not None:
            ids, nums = rows["job_id"].drop_nulls().unique(), rows["job_num"].drop_nulls().unique()
            old = old.filter(~(pl.col("job_id").is_in(ids) | pl.col("job_num").is_in(nums)).fill_null(False))
            if old.height:
                rows = pl.concat([old, rows], how="vertical").sort("job_num", nulls_last=True, maintain_order=True)
    return write_parquet_atomic(rows, part)


class SchemaConflict(ValueError):
    """A part whose column types contradict the schema (not merely older: wrong)."""


REQUIRED_COLUMNS = ("sweep_id", "job_id", "model", "formula", "status")
"""Columns every part and table memsweep ever wrote has (the first contract's), job_id and status
never null: a Parquet file without them is not memsweep's, whatever its name."""


class NotMemsweep(ValueError):
    """A Parquet file named like memsweep's that memsweep did not write (other columns, no job ids)."""


def foreign_columns(columns: Iterable[str]) -> str | None:
    """Why a file with these columns is not memsweep's, or None."""
    missing = [c for c in REQUIRED_COLUMNS if c not in set(columns)]
    return f"no column{'s' if len(missing) > 1 else ''} {', '.join(missing)}" if missing else None


def check_ours(df: pl.DataFrame) -> pl.DataFrame:
    """`df` when it is a part (or table) memsweep wrote; `NotMemsweep` saying why otherwise."""
    why = foreign_columns(df.columns)
    if why is None:
        nulls = [c for c in ("job_id", "status") if df[c].null_count()]
        why = f"rows without {' or '.join(nulls)}" if nulls else None
    if why:
        raise NotMemsweep(why)
    return df


def foreign_file(path: Path, unreadable: str | None = None) -> str | None:
    """Why the Parquet file at `path` is not memsweep's (its columns, read from the footer
    only), or None; a file that cannot be read says `unreadable` (by default nothing either way)."""
    try:
        return foreign_columns(pl.read_parquet_schema(path))
    except Exception:
        return unreadable


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
    """Hydra job directories: each holds a `.hydra/` folder written when the job starts (a batch
    of the batched launcher, its record of the batch's jobs)."""
    return sorted(p.parent for p in Path(root).rglob(".hydra") if p.is_dir())


@dataclass
class Held:
    """Where a job's rows are."""

    part: Path
    done: bool
    """Every row of the job is ok (or unsupported): `resume=true` skips it."""


def held_rows(parts: list[Path]) -> dict[str, Held]:
    """Job id -> the part that holds its rows. A part that cannot be read holds nothing."""
    if not parts:
        return {}
    try:
        t = pl.scan_parquet(parts, include_file_paths="part").select("job_id", "status", "part").collect()
    except Exception:  # a corrupt part, or parts of different schema versions: one by one
        frames = []
        for p in parts:
            try:
                frames.append(pl.read_parquet(p, columns=["job_id", "status"]).with_columns(part=pl.lit(str(p))))
            except Exception:
                continue
        if not frames:
            return {}
        t = pl.concat(frames, how="vertical_relaxed")
    done = t.group_by("job_id", "part").agg(pl.col("status").is_in(list(FINISHED)).fill_null(False).all().alias("done"))
    out: dict[str, Held] = {}
    for jid, part, ok in done.sort("part").iter_rows():
        if jid is not None and (jid not in out or ok):
            out[jid] = Held(Path(part), bool(ok))
    return out


_batches_seen: dict[Path, tuple[tuple, dict[str, Held]]] = {}


def held_in_batch(job_dir: Path, jid: str) -> Held | None:
    """For a job run on its own (the basic launcher, a measured job): the batch part beside its
    directory that holds its rows, where the batched launcher wrote them (read again only when
    a batch part changed)."""
    grid_dir = Path(job_dir).resolve().parent
    parts = sorted(grid_dir.glob(f"{BATCH_PREFIX}*/{PART_NAME}"))
    if not parts:
        return None
    try:
        stamp = tuple((str(p), p.stat().st_mtime_ns) for p in parts)
    except OSError:  # one went meanwhile: read them again
        stamp = ()
    seen = _batches_seen.get(grid_dir)
    if seen is None or seen[0] != stamp or not stamp:
        seen = _batches_seen[grid_dir] = (stamp, held_rows(parts))
    return seen[1].get(jid)


def jobs_in(job_dir: Path) -> int:
    """The jobs a job directory stands for: a batch's, as its record lists them; otherwise one."""
    try:
        with open(Path(job_dir) / BATCH_RECORD, "rb") as fh:
            return max(1, sum(1 for line in fh if line.strip()))
    except OSError:
        return 1


def _read_parts(parts: list[Path]) -> tuple[list[pl.DataFrame], list[tuple[Path, str]], set[Path]]:
    """Every part at once when they agree (one multi-file read, the common case); otherwise part
    by part, so one corrupt, conflicting or foreign part is reported and the rest still land."""
    if parts:
        try:
            return [align(check_ours(pl.read_parquet(parts)))], [], {p.parent for p in parts}
        except Exception:  # a bad part, or parts of different schema versions: go one by one
            pass
    frames, skipped, with_rows = [], [], set()
    for part in parts:
        try:
            frames.append(align(check_ours(pl.read_parquet(part))))
            with_rows.add(part.parent)
        except NotMemsweep as exc:  # a rows.parquet memsweep did not write: never merged
            skipped.append((part, f"not memsweep's: {exc}"))
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


def _job_nums(part: Path) -> list[int]:
    try:
        return pl.read_parquet(part, columns=["job_num"])["job_num"].drop_nulls().to_list()
    except Exception:  # reported with the part's other troubles
        return []


class CollectRefused(ValueError):
    """A directory collect will not merge. The message is one line, `DIR='...': why; allowed: ...`;
    `why` and `allowed` are there for a caller that names the directory another way (fit's PATH)."""

    def __init__(self, root: Path, why: str, allowed: str, key: str = "DIR"):
        self.root, self.why, self.allowed = Path(root), why, allowed
        super().__init__(f"{key}={str(root)!r}: {why}; allowed: {allowed}")


class NotASweep(CollectRefused):
    """Nothing memsweep or Hydra leaves is in the directory or right under it (`/`, a home folder)."""


class SeveralSweeps(CollectRefused):
    """The directory holds several sweeps (or runs): merged only when asked for."""


class NoRows(CollectRefused):
    """A sweep or run directory without a part of memsweep's (and without a table): nothing to collect."""


def _listed(names: list[str], shown: int = 3) -> str:
    more = f", +{len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def sweep_markers(root: Path) -> dict[str, list[str]]:
    """What marks `root` as a directory memsweep wrote, from it and the folders right under it,
    never deeper: Hydra's multirun.yaml and .hydra/, memsweep's grids.json, a rows.parquet or
    results.parquet of memsweep's columns. {"": root's own markers} when it has any, else
    {subfolder: its markers}; {} for any other folder (`/`, a home folder: never walked)."""
    def markers(d: Path) -> list[str]:
        found = [n for n in SWEEP_FILES if (d / n).is_file()]
        found += [".hydra/"] if (d / ".hydra").is_dir() else []
        if not found:  # a Parquet footer is read only where nothing cheaper says so
            found = [n for n in (PART_NAME, RESULTS_NAME)
                     if (d / n).is_file() and foreign_file(d / n, unreadable="unreadable") is None]
        return found

    root = Path(root)
    own = markers(root)
    if own:
        return {"": own}
    return {d.name: found for d in sorted(_subdirs(root)) if (found := markers(d))}


def check_collectable(root: Path, merge: bool = True) -> dict[str, list[str]]:
    """Refuse `root` before anything under it is walked: a folder memsweep did not write
    (`NotASweep`), and one holding several sweep or run directories side by side unless `merge`
    (`SeveralSweeps`). Returns its markers (`sweep_markers`)."""
    found = sweep_markers(root)
    if not found:
        raise NotASweep(root, "not a sweep or run directory (no multirun.yaml, grids.json, .hydra/ or "
                        "memsweep rows.parquet in it or a folder right under it)",
                        "a directory a memsweep sweep or run wrote (its hydra.sweep.dir or hydra.run.dir)")
    sweeps = [name for name, marks in found.items() if name and set(marks) & set(SWEEP_FILES)]
    if len(sweeps) > 1 and not merge:
        raise SeveralSweeps(root, f"holds {len(sweeps)} sweep or run directories ({_listed(sweeps)})",
                            "one of them, or --merge to collect them into one table")
    return found


def collect(root: Path, write: bool = True, merge: bool = True, need_rows: bool = False) -> Collected:
    """Merge every part under `root` into one table and (atomically) `root/results.parquet`.

    `root` must be a directory memsweep wrote (`check_collectable`: `NotASweep` otherwise, before
    anything is walked); rows of several sweeps (sweep_id) are merged only with `merge`, else
    `SeveralSweeps` and nothing is written (the end of a sweep merges: a sweep directory moved and
    resumed holds two ids). With `need_rows`, a directory with no part memsweep wrote and no table
    is `NoRows` (nothing written). A part memsweep did not write is skipped and reported. An existing
    results.parquet is never replaced by a table that lacks any of its jobs or ok rows, nor when
    memsweep did not write it: it is kept, and `kept` says why. Temp files of killed writes are
    removed (`clean_stale_temps`)."""
    root = Path(root)
    check_collectable(root, merge)
    parts = find_parts(root)
    frames, skipped, with_rows = _read_parts(parts)
    table = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=SCHEMA)
    ids = sorted(table["sweep_id"].drop_nulls().unique().to_list())
    if len(ids) > 1 and not merge:
        raise SeveralSweeps(root, f"holds the rows of {len(ids)} sweeps (sweep_id {_listed(ids)})",
                            "the directory of one sweep, or --merge to collect them into one table")
    if need_rows and not frames and not (root / RESULTS_NAME).is_file():
        foreign = f" ({len(skipped)} skipped: {skipped[0][1]})" if skipped else ""
        raise NoRows(root, f"holds no part memsweep wrote ({PART_NAME}){foreign}",
                     "a sweep or run directory where a job finished")
    cleaned = len(clean_stale_temps(root)) if write else 0
    # Within a job, rows keep the order the job wrote them in (the formula registry's order).
    table = table.sort(["job_num", "job_id"], nulls_last=True, maintain_order=True)
    # a job directory whose job's rows a batch part beside it holds (a batched sweep resumed by
    # the basic launcher, which writes .hydra/ for every job) has its rows
    in_batches = {(p.parent.parent, n) for p in parts if p.parent.name.startswith(BATCH_PREFIX) for n in _job_nums(p)}
    missing = [d for d in job_dirs(root) if d not in with_rows and d != root
               and not (d.name.isdigit() and (d.parent, int(d.name)) in in_batches)]
    path, kept = None, None
    if write:
        target = root / RESULTS_NAME
        foreign = foreign_file(target) if target.is_file() else None
        if foreign:  # a user's file of that name: never overwritten
            path, kept = target, (f"kept {target}: memsweep did not write it ({foreign}); nothing written "
                                  f"(move it away to collect here)")
        else:
            kept = would_lose(target, table)
            if kept:
                path, table = target, align(pl.read_parquet(target))
            else:
                path = write_parquet_atomic(table, target)
    return Collected(table=table, path=path, parts=len(parts), skipped=skipped,
                     jobs_without_rows=missing, kept=kept, cleaned=cleaned)


# --- the printed summary ------------------------------------------------------------------

SUMMARY_ROWS = 40
"""Jobs the end-of-sweep table prints in full; a longer sweep prints `SUMMARY_COMPACT_ROWS` of them
(every model, the jobs that are not ok, then those nearest the capacity) and points to the Parquet."""
SUMMARY_COMPACT_ROWS = 20
FIT_FORMULA = "detailed"
"""The formula whose fits, headroom and peak moment the summary shows (the planner's); the first
formula of the table when a sweep did not run it."""
ROW_SPEC_KEYS = {"model": "model.name", "workload": "workload.name", "optimizer": "optimizer.name",
                 "hardware": "hardware.name", "seq": "seq", "batch": "batch", "dtype": "dtype"}
"""Result columns that hold a spec key: what a row without spec_json (a job whose config failed,
a part older than schema 3) still says about its job."""
ALWAYS_SHOWN = ("seq", "dtype")
FINISHED = ("ok", "unsupported")


def flat_spec(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A JobSpec's plain data (the spec_json column) as dotted keys: {"model.layers": 32, ...};
    lists become one string ("q,v"; nested lists their JSON)."""
    out: dict[str, Any] = {}
    for key, value in spec.items():
        kind = type(value)
        if kind is dict:
            out.update(flat_spec(value, f"{prefix}{key}."))
        elif kind is list:
            flat = not any(type(v) in (list, dict) for v in value)
            out[f"{prefix}{key}"] = ",".join(map(str, value)) if flat else json.dumps(value)
        else:
            out[f"{prefix}{key}"] = value
    return out


GROUP_KEYS = ("model", "workload", "optimizer", "hardware", "parallel", "measure")
"""Config groups: `model=gpt2` on a command line is the spec's `model.name`."""


def _override_value(text: str) -> Any:
    """A command-line value as the spec holds it: 2, 0.1, true / false, null, or the text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "null":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text.strip("'\"")


def _job_keys(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One job's configuration as dotted keys: its spec_json; for a job whose configuration failed
    (no spec), what its result columns say and the overrides it was given."""
    text = next((r["spec_json"] for r in rows if r.get("spec_json")), None)
    if text:
        try:
            return flat_spec(json.loads(text))
        except (ValueError, TypeError, AttributeError):
            pass
    out = {key: rows[0][col] for col, key in ROW_SPEC_KEYS.items() if rows[0].get(col) is not None}
    try:
        overrides = json.loads(rows[0].get("overrides") or "[]")
    except ValueError:
        overrides = []
    for o in overrides if isinstance(overrides, list) else ():
        key, eq, value = str(o).lstrip("+~").partition("=")
        if eq:
            out[f"{key}.name" if key in GROUP_KEYS else key] = _override_value(value)
    return out


def swept_keys(jobs: list[Mapping[str, Any]]) -> list[str]:
    """The keys whose values differ between jobs, nested ones included: what a sweep swept, from
    the jobs themselves (a resumed or added grid, a second model: whatever is in the table). A
    group's other keys are left out where its name explains them (model=gpt2,tiny: not
    model.layers, model.hidden, ...; model.layers=2,4 of one model: model.layers)."""
    enc = jobs  # one-level values (flat_spec): hashable as they are
    differ = [k for k in dict.fromkeys(k for e in enc for k in e) if len({e[k] for e in enc if k in e}) > 1]
    by_name: dict[str, dict[Any, list]] = {}  # a group's name key -> each name -> its jobs
    out = []
    for key in differ:
        group, dot, rest = key.partition(".")
        name = f"{group}.name"
        if dot and rest != "name" and name in differ:
            if name not in by_name:
                by_name[name] = {}
                for e in enc:
                    by_name[name].setdefault(e.get(name), []).append(e)
            if all(len({e[key] for e in among if key in e}) <= 1 for among in by_name[name].values()):
                continue
        out.append(key)
    return out


def _label(key: str) -> str:
    """model.name -> model; other keys as typed on the command line."""
    return key[: -len(".name")] if key.endswith(".name") and key.count(".") == 1 else key


def _job_status(statuses: list[str]) -> str:
    """A job's status: the first that is neither ok nor unsupported (error, oom, skipped, ...: the
    whole job's), else ok when a formula answered, else unsupported."""
    bad = [s for s in statuses if s not in FINISHED]
    if bad:
        return bad[0]
    return "ok" if "ok" in statuses else (statuses[0] if statuses else "")


def _sort_key(value: Any) -> tuple:
    if value is None:
        return (3, "")
    if isinstance(value, (bool, int, float)):
        return (0, float(value))
    return (1, str(value))


def _gib(value: float | None, scale: float) -> str:
    """Two decimals; three significant digits below 0.1 (a tiny model's rows in a GiB table)."""
    if value is None:
        return ""
    x = value / scale
    return f"{x:.2f}" if abs(x) >= 0.1 or x == 0 else f"{x:.3g}"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


@dataclass
class JobTable:
    """The end-of-sweep table: one row per job, as strings ready to print."""

    table: pl.DataFrame
    unit: str
    jobs: int
    models: list[str]
    fit_formula: str | None
    capacity: str | None
    """The capacity line when every job has the same; None when it is a column."""
    shown_jobs: int


def job_table(table: pl.DataFrame, limit: int | None = SUMMARY_ROWS) -> JobTable | None:
    """One row per job: every key the jobs differ in (nested overrides, the model), seq and dtype,
    the total per formula, the measured peak, capacity, headroom and fits of `FIT_FORMULA`, its
    peak moment, and the job's status (an error, oom or skipped job is a row too). More than
    `limit` jobs: `SUMMARY_COMPACT_ROWS` of them (`shown_jobs`)."""
    if table.height == 0:
        return None
    by_job: dict[Any, list[dict[str, Any]]] = {}
    for name in ("est_step_time_s", "est_tokens_per_s", "step_time_s"):  # parts older than schema 8
        if name not in table.columns:
            table = table.with_columns(pl.lit(None, dtype=pl.Float64).alias(name))
    needed = dict.fromkeys(["job_id", "job_num", "formula", "status", "spec_json", "overrides", "total_bytes",
                            "headroom_bytes", "capacity_bytes", "fits", "peak_phase", "measured_peak_bytes",
                            "kv_tokens", "max_concurrent_seqs", "est_step_time_s", "est_tokens_per_s",
                            "step_time_s", *ROW_SPEC_KEYS])  # not all ~100 columns
    needed = {name: pl.col(name) for name in needed}
    # a job's spec_json is the same on each of its rows: only its first is read (thousands of jobs)
    first_spec = pl.col("spec_json").is_not_null() & (
        pl.col("job_id").is_null() | (pl.col("spec_json").is_not_null().cast(pl.Int64).cum_sum().over("job_id") == 1))
    needed["spec_json"] = pl.when(first_spec).then(pl.col("spec_json")).alias("spec_json")
    for i, r in enumerate(table.select(list(needed.values())).iter_rows(named=True)):
        by_job.setdefault(r["job_id"] if r["job_id"] is not None else ("row", i), []).append(r)
    formulas = table.filter(pl.col("total_bytes").is_not_null())["formula"].unique(maintain_order=True).to_list()
    fit = FIT_FORMULA if FIT_FORMULA in formulas else (formulas[0] if formulas else None)
    keys = {jid: _job_keys(rows) for jid, rows in by_job.items()}
    swept = swept_keys(list(keys.values()))
    columns = [k for k in ("model.name", *ALWAYS_SHOWN) if k in swept or k in ALWAYS_SHOWN]
    columns += [k for k in swept if k not in columns]
    models = list(dict.fromkeys(str(k.get("model.name")) for k in keys.values() if k.get("model.name") is not None))
    largest = max([v for v in (*table["total_bytes"].to_list(), *table["measured_peak_bytes"].to_list())
                   if v is not None] or [0])
    unit, scale = ("GiB", GIB) if largest >= GIB else ("MiB", MIB)
    backend = table["measure_backend"].drop_nulls().first() if table["measured_peak_bytes"].null_count() < table.height else None
    capacities = set(table["capacity_bytes"].drop_nulls().to_list())

    jobs = []
    for jid, rows in by_job.items():
        status = _job_status([r["status"] for r in rows if r["status"]])
        by_formula = {r["formula"]: r for r in rows if r["formula"] is not None}
        f = by_formula.get(fit, {}) if fit else {}
        peak = f.get("peak_phase") or next((r["peak_phase"] for r in rows if r.get("peak_phase")), None)
        cap = next((r["capacity_bytes"] for r in rows if r["capacity_bytes"] is not None), None)
        total = f.get("total_bytes")  # an oom or skipped measurement keeps its estimates
        headroom = f.get("headroom_bytes")
        if headroom is None and total is not None and cap is not None:  # a part older than schema 6
            headroom = cap - total
        jobs.append({
            "keys": [keys[jid].get(k) for k in columns],
            "totals": [by_formula.get(name, {}).get("total_bytes") for name in formulas],
            "measured": next((r["measured_peak_bytes"] for r in rows if r["measured_peak_bytes"] is not None), None),
            "kv_tokens": next((r["kv_tokens"] for r in rows if r["kv_tokens"] is not None), None),
            "seqs": next((r["max_concurrent_seqs"] for r in rows if r["max_concurrent_seqs"] is not None), None),
            "capacity": cap, "headroom": headroom if total is not None else None,
            "fits": f.get("fits") if total is not None else None, "peak": peak, "status": status,
            "job": rows[0]["job_num"],
            "step_s": next((r["est_step_time_s"] for r in rows if r["est_step_time_s"] is not None), None),
            "tps": next((r["est_tokens_per_s"] for r in rows if r["est_tokens_per_s"] is not None), None),
            "measured_s": next((r["step_time_s"] for r in rows if r["step_time_s"] is not None), None),
        })
    jobs.sort(key=lambda j: (*map(_sort_key, j["keys"]), _sort_key(j["job"])))
    shown = jobs
    if limit is not None and len(jobs) > limit:
        shown = _compact(jobs, SUMMARY_COMPACT_ROWS, columns.index("model.name") if "model.name" in columns else None)

    out: dict[str, list] = {_label(k): [] for k in columns}
    served = any(j["seqs"] is not None for j in jobs)
    for j in shown:
        for k, v in zip(columns, j["keys"]):
            out[_label(k)].append("" if v is None else str(v).lower() if isinstance(v, bool) else str(v))
        for name, v in zip(formulas, j["totals"]):
            out.setdefault(name, []).append(_gib(v, scale))
        if backend is not None:
            out.setdefault(f"measured ({backend})", []).append(_gib(j["measured"], scale))
        if served:
            out.setdefault("kv_tokens", []).append("" if j["kv_tokens"] is None else str(j["kv_tokens"]))
            out.setdefault("concurrent seqs", []).append("" if j["seqs"] is None else str(j["seqs"]))
        if fit is not None:
            if len(capacities) > 1:
                out.setdefault("capacity", []).append(_gib(j["capacity"], scale))
            out.setdefault("headroom", []).append(_gib(j["headroom"], scale))
            out.setdefault("fits", []).append({True: "yes", False: "no"}.get(j["fits"], ""))
        if any(x["peak"] for x in jobs):
            out.setdefault("peak", []).append(j["peak"] or "")
        if any(x["step_s"] is not None for x in jobs):  # the time model (formulas/timing.py)
            out.setdefault("est step s", []).append(_seconds(j["step_s"]))
            out.setdefault("est tok/s/GPU", []).append("" if j["tps"] is None else f"{j['tps']:,.0f}")
        if any(x["measured_s"] is not None for x in jobs):
            out.setdefault("measured step s", []).append(_seconds(j["measured_s"]))
        out.setdefault("status", []).append(j["status"])
        out.setdefault("job", []).append("" if j["job"] is None else str(j["job"]))
    capacity = None
    if fit is not None and len(capacities) == 1:
        hardware = ", ".join(table["hardware"].drop_nulls().unique(maintain_order=True).to_list())
        margins = table["margin"].drop_nulls().unique().to_list()
        margin = f", margin {margins[0]:g}" if len(margins) == 1 else ""
        capacity = f"capacity {_gib(next(iter(capacities)), scale)} {unit} per GPU ({hardware}{margin})"
    return JobTable(pl.DataFrame(out, schema={k: pl.String for k in out}), unit, len(jobs), models, fit,
                    capacity, len(shown))


def _compact(jobs: list[dict], n: int, model_at: int | None) -> list[dict]:
    """`n` of the jobs, in their order: each model's nearest the capacity, every job that is not
    ok (as many as fit), then the ones nearest the capacity (where fits flips)."""
    def nearness(j: dict) -> float:
        return abs(j["headroom"]) if j["headroom"] is not None else float("inf")

    picked: list[int] = []
    if model_at is not None:
        best: dict[Any, int] = {}
        for i, j in enumerate(jobs):
            m = j["keys"][model_at]
            if m not in best or nearness(j) < nearness(jobs[best[m]]):
                best[m] = i
        picked += best.values()
    models = len(picked)
    picked += [i for i, j in enumerate(jobs) if j["status"] != "ok"]
    picked += sorted(range(len(jobs)), key=lambda i: nearness(jobs[i]))
    chosen = list(dict.fromkeys(picked))[:max(n, models)]
    return [jobs[i] for i in sorted(chosen)]


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
        print(f"jobs without rows (interrupted?): {sum(map(jobs_in, collected.jobs_without_rows))}", file=out)
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
    errors = t.filter(~pl.col("status").is_in(list(FINISHED))).unique("job_id", maintain_order=True)
    for row in errors.head(5).iter_rows(named=True):
        print(f"  job {row['job_num']}: {row['status']}: {row['error']}", file=out)
    jt = job_table(t)
    if jt is None:
        return
    model = f", model={jt.models[0]}" if len(jt.models) == 1 else ""
    print(f"total {jt.unit} per GPU by formula, one row per job{model}:", file=out)
    if jt.fit_formula is not None:
        cap = f"{jt.capacity}; " if jt.capacity else ""
        print(f"{cap}headroom (capacity - total), fits and peak moment: {jt.fit_formula}", file=out)
    print(markdown_table(jt.table), file=out)
    if jt.shown_jobs < jt.jobs:
        print(f"{jt.jobs} jobs: every row is in {collected.path} (shown: {jt.shown_jobs}: every model, "
              f"the jobs not ok, then those nearest the capacity)", file=out)


def markdown_table(df: pl.DataFrame, float_precision: int = 3) -> str:
    """A DataFrame as a Markdown table (no dtypes, no shape, nothing elided)."""
    with pl.Config(tbl_formatting="ASCII_MARKDOWN", tbl_hide_column_data_types=True,
                   tbl_hide_dataframe_shape=True, tbl_rows=-1, tbl_cols=-1,
                   float_precision=float_precision, tbl_width_chars=10000, fmt_str_lengths=1000):
        return str(df)
