"""One sweep job: config -> spec -> rows -> an atomically written part. It never raises.

Hydra skips `on_multirun_end` when any job raises, so every failure, expected or not, becomes a
row with `status` and `error` here, and collection sees every job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from memsweep.app.cli import grid_of
from memsweep.app.convert import JOB_KEYS, time_constants_of, to_job_spec
from memsweep.formulas import job_formulas
from memsweep.errors import ConfigError
from memsweep.estimate import estimate_rows
from memsweep.results import (
    BATCH_PREFIX, PART_NAME, OutputError, clean_stale_temps, frame, held_in_batch, merge_part, write_part,
)
from memsweep.specs import JobSpec
from memsweep.units import GIB

log = logging.getLogger("memsweep")

# Exit status of the last single (non-multirun) job, for sweep.py to return to the shell.
last_exit_code = 0


def job_id(cfg: DictConfig | dict) -> str:
    """A stable id: a hash of the resolved job configuration (same config, same id); the
    `resume` switch itself is left out, so a resumed job keeps its id. A dict is that resolved
    configuration already (the batched launcher's): the same config, the same id."""
    try:
        payload: Any = dict(cfg) if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
        if isinstance(payload, dict):
            payload.pop("resume", None)
            payload.pop("add", None)
            if payload.get("time") is None:  # the default constants: ids of sweeps before the key stay
                payload.pop("time", None)
    except Exception:  # an unresolvable config still gets a stable id from its raw text
        payload = OmegaConf.to_yaml(cfg)
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def sweep_id(sweep_dir: Path) -> str:
    """`outputs/multirun/2026-11-25_10-00-00` -> `2026-11-25_10-00-00`."""
    return Path(sweep_dir).name


def error_row(cfg: DictConfig, choices: dict[str, str], message: str) -> dict[str, Any]:
    """What is known of a job that could not run: its group choices and raw top-level values."""
    row: dict[str, Any] = {k: choices.get(k) for k in ("model", "workload", "optimizer", "hardware")}
    for key in JOB_KEYS:
        row[key] = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    return {**row, "status": "error", "error": message}


def describe(spec: JobSpec) -> str:
    return (f"{spec.model.name} {spec.workload.name} seq={spec.seq} batch={spec.batch} "
            f"{spec.dtype}/{spec.effective_precision} recompute={spec.recompute} "
            f"attention={spec.attention} parallel={spec.parallel.name}")


def with_measurement(spec: JobSpec, rows: list[dict[str, Any]], job_num: int) -> list[dict[str, Any]]:
    """Measure the job once and put the measured columns on every formula's row.

    torch is imported here, and only here: an analytic sweep never pays for it.
    """
    backend = spec.measure.backend
    print(f"[job {job_num}] measure={backend}: {describe(spec)} ...", flush=True)
    try:
        from memsweep.measure.backends import measure, measure_isolated
    except ImportError as exc:
        fields = {"measure_backend": backend, "status": "error",
                  "error": f"measure={backend} needs torch ({exc}); install: pip install -e '.[measure]'"}
        print(f"[job {job_num}] error: {fields['error']}", flush=True)
        return [{**r, **fields} for r in rows]
    m = measure_isolated(spec) if spec.measure.isolate else measure(spec)
    detailed = next((r.get("total_bytes") for r in rows if r["formula"] == "detailed"), None)
    if m.status == "ok":
        vs = f" (detailed {detailed / GIB:.2f})" if detailed is not None else ""
        print(f"[job {job_num}] ok: peak {m.peak_bytes / GIB:.2f} GiB{vs} in {m.wall_s:.1f} s", flush=True)
    else:
        print(f"[job {job_num}] {m.status}: {m.error} ({m.wall_s:.1f} s)", flush=True)
    fields = m.row_fields()
    if m.status != "ok":
        fields.update(status=m.status, error=m.error)
    counted = {"params": m.params, "trainable_params": m.trainable_params}  # only where no formula counted
    return [{**r, **fields, **{k: v for k, v in counted.items() if r.get(k) is None}} for r in rows]


DONE = {"ok", "unsupported"}
"""Statuses of a finished job's rows: `unsupported` is a measured model no formula models."""


def finished(out_dir: Path, jid: str) -> bool:
    """This job's rows are already here, all ok (a resumed sweep skips it)."""
    part = out_dir / PART_NAME
    if not part.is_file():
        return False
    try:
        done = pl.read_parquet(part, columns=["job_id", "status"])
    except Exception:  # a corrupt part: run the job again
        return False
    return done.height > 0 and set(done["job_id"]) == {jid} and set(done["status"]) <= DONE


SWEEP_PID_ENV = "MEMSWEEP_SWEEP_PID"
"""Set by sweep.py to its own pid: a job in another process (a launcher's worker) watches it."""

_watchdog: threading.Thread | None = None


def watch_sweep_process(poll_s: float = 0.5) -> None:
    """In a launcher's worker process (joblib / loky, submitit local), exit as soon as the sweep
    process that started it is gone: killing a sweep stops its workers instead of leaving them
    writing parts for minutes. Parts are written atomically, so an exit mid-write leaves only a
    temp file, which the next collect or resume removes."""
    global _watchdog
    sweep_pid = os.environ.get(SWEEP_PID_ENV, "")
    if _watchdog is not None or not sweep_pid.isdigit() or int(sweep_pid) == os.getpid():
        return
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:  # re-parented: whoever started this worker is gone
                os._exit(143)

    _watchdog = threading.Thread(target=watch, name="memsweep-sweep-watch", daemon=True)
    _watchdog.start()


def check_switch(cfg: DictConfig | dict, key: str) -> bool:
    """A top-level true/false key (`resume`) of a composed or a plain configuration."""
    if isinstance(cfg, dict):
        value = cfg.get(key, False)
    else:
        value = OmegaConf.select(cfg, key, default=False, throw_on_resolution_failure=False)
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true, false")
    return value


@dataclass(frozen=True)
class Prepared:
    """What `estimate_rows` takes for a job: its validated spec, its formulas, its time constants."""

    spec: JobSpec
    formulas: Any
    time: Any


def prepare(cfg: DictConfig | dict, cache: dict[Any, Any] | None = None) -> Prepared:
    """A job's configuration checked and turned into what its estimate needs: the steps of every
    analytic job, `run_job`'s one at a time and the batched launcher's many at once. A bad value
    raises its ConfigError. With `cache`, the formulas and time constants are built once per
    distinct key (a sweep's jobs share a few), so jobs that share them hold the same objects,
    and a key that failed fails every job of it with the same error."""
    check_switch(cfg, "resume")
    spec = to_job_spec(cfg)
    cache = {} if cache is None else cache
    fkey = ("formulas", spec.formulas, spec.formula_option, spec.formula_base, spec.formula_constants)
    time_cfg = cfg.get("time") if isinstance(cfg, dict) else OmegaConf.select(cfg, "time", default=None)
    tkey = ("time", json.dumps(OmegaConf.to_container(time_cfg) if isinstance(time_cfg, DictConfig) else time_cfg,
                               sort_keys=True, default=str))
    return Prepared(spec, _once(cache, fkey, lambda: job_formulas(spec)),
                    _once(cache, tkey, lambda: time_constants_of(cfg)))


def _once(cache: dict[Any, Any], key: Any, make: Any) -> Any:
    if key not in cache:
        try:
            cache[key] = make()
        except Exception as exc:  # noqa: BLE001 (every job of this key fails the same way)
            cache[key] = exc
    if isinstance(cache[key], Exception):
        raise cache[key]
    return cache[key]


def failure(exc: BaseException, num: int | None = None) -> tuple[int, str]:
    """A failed job's exit code and its row's one-line message: 2 and the message of a bad value
    (a ConfigError), 1 and the exception's first line for anything else (its traceback goes to
    the debug log)."""
    if isinstance(exc, ConfigError):
        return 2, str(exc)
    label = "job failed" if num is None else f"job {num} failed"
    log.debug("%s:\n%s", label, "".join(traceback.format_exception(exc)))
    return 1, f"{type(exc).__name__}: {exc}".splitlines()[0]


def run_job(cfg: DictConfig) -> int:
    """Never raises: whatever fails becomes an error row (Hydra would otherwise skip collection)."""
    global last_exit_code
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out_dir = Path(hc.runtime.output_dir)
    if multirun:
        watch_sweep_process()
    meta = {
        "sweep_id": sweep_id(Path(hc.sweep.dir) if multirun else out_dir),
        "job_num": int(hc.job.num) if multirun else 0,
        "job_id": job_id(cfg),
        # what this job was given (the swept values among them): the summary names a failed job by it
        "overrides": json.dumps(grid_of(list(hc.overrides.task))),
    }
    choices = dict(hc.runtime.choices)
    code, message, held = 0, "", None
    try:
        # rows the batched launcher wrote into a batch part (a sweep resumed with another launcher)
        held = held_in_batch(out_dir, meta["job_id"]) if multirun else None
        if check_switch(cfg, "resume"):
            clean_stale_temps(out_dir)
            if finished(out_dir, meta["job_id"]) or (held is not None and held.done):
                print(f"[job {meta['job_num']}] resume: rows exist, skipped", flush=True)
                return 0
        ready = prepare(cfg)  # the batched launcher's steps too (memsweep.app.batched._evaluate)
        rows = estimate_rows(ready.spec, ready.formulas, time=ready.time)
        if ready.spec.measure.backend != "none":
            rows = with_measurement(ready.spec, rows, meta["job_num"])
    except Exception as exc:  # noqa: BLE001 (a bad value, or unexpected: the row says what)
        code, message = failure(exc)
        rows = [error_row(cfg, choices, message)]
    # a job's rows are in one part: held in a batch's, its new rows replace them there
    into = held.part.parent if held is not None else out_dir
    code, message = _write_rows(rows, meta, into, cfg, choices, code, message)
    if code:
        label = f"job {meta['job_num']}: " if multirun else ""
        print(f"error: {label}{message}", file=sys.stderr)
    if not multirun:
        last_exit_code = code
    return code


def _write_rows(rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path, cfg: DictConfig,
                choices: dict[str, str], code: int, message: str) -> tuple[int, str]:
    """Write the job's part (into a batch's part: beside its other jobs); rows that cannot be
    written become one error row saying why; a directory that cannot be written to is the job's
    error (its message names the path)."""
    def write(rows: list[dict[str, Any]]) -> None:
        if out_dir.name.startswith(BATCH_PREFIX):
            merge_part(frame(rows), out_dir)
        else:
            write_part(rows, out_dir)

    try:
        try:
            write([{**r, **meta} for r in rows])
        except OutputError:
            raise
        except Exception as exc:  # a value no column can hold: the job still leaves a row
            code, message = 1, f"rows not writable: {type(exc).__name__}: {exc}".splitlines()[0]
            write([{**error_row(cfg, choices, message), **meta}])
    except OutputError as exc:
        return 1, str(exc.strerror)
    return code, message
