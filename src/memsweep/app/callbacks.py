"""Hydra callbacks: guard a sweep directory's grid when a multirun starts, and collect the parts
into `results.parquet` when a run or multirun ends."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import polars as pl
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from memsweep.app.cli import GRID_NAME, grid_of, grid_tag, recorded_grids
from memsweep.results import RESULTS_NAME, Collected, CollectRefused, OutputError, collect, find_parts, summarize, write_text_atomic

failed_jobs = 0
"""Jobs with status=error in the table the last collection wrote (sweep.py's exit status)."""
collect_error: str | None = None
"""Why the last collection could not write its table (a full disk): sweep.py says so, exit 1.
(Hydra only warns about a raising callback.)"""


def _switch(config: DictConfig, key: str) -> bool:
    return OmegaConf.select(config, key, default=False, throw_on_resolution_failure=False) is True


def check_grid(sweep_dir: Path, grid: list[str], add: bool, resume: bool, key: str = "hydra.sweep.dir") -> str | None:
    """Record this grid in `sweep_dir/grids.json`, or say why not: a sweep directory belongs to
    one grid, so a different grid there is refused unless the user asks to add it (`add=true`,
    whose jobs go to their own subdirectories); the same grid again (resume=true) is welcome.
    A single run's directory (key hydra.run.dir) holds one configuration the same way."""
    options = ("resume=true with that grid, or add=true to add this grid's jobs" if key == "hydra.sweep.dir"
               else "or the same configuration again")
    record = sweep_dir / GRID_NAME
    entries = recorded_grids(sweep_dir)
    grids = [list(g.get("overrides", ())) for g in entries]
    if record.is_file() and not entries:
        return f"{key}={str(sweep_dir)!r}: unreadable {GRID_NAME}; allowed: a new directory"
    if not record.is_file() and not add and (find_parts(sweep_dir) or (sweep_dir / RESULTS_NAME).is_file()) and not resume:
        return (f"{key}={str(sweep_dir)!r} holds results memsweep cannot match to this grid; allowed: a new "
                f"directory, {options}")
    if grid in grids:
        return None
    if grids and not add:
        shown = " ".join(grids[-1]) or "(no overrides)"
        return (f"{key}={str(sweep_dir)!r} holds another grid ({shown}); allowed: a new directory, {options}")
    entries.append({"overrides": grid, "subdir": grid_tag(grid) if add else ""})  # as sweep.py chose
    write_text_atomic(json.dumps({"grids": entries}, indent=1), record)
    return None


def _collect(root: Path) -> Collected:
    global failed_jobs
    collected = collect(root)
    t = collected.table
    failed_jobs = t.filter(pl.col("status") == "error")["job_id"].n_unique() if t.height else 0
    return collected


class CollectResults(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        grid = grid_of(list(config.hydra.overrides.task))
        try:
            why = check_grid(sweep_dir, grid, add=_switch(config, "add"), resume=_switch(config, "resume"))
        except OutputError as exc:
            why = str(exc.strerror)
        if why:  # before any job runs
            print(f"error: {why}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir))
        if _switch(config, "add"):
            why = "add=true: not allowed; allowed: add=true with -m (it adds a grid to a sweep directory)"
        else:
            try:  # a run directory holds one job: another configuration there would replace its part
                why = check_grid(run_dir, grid_of(list(config.hydra.overrides.task)), add=False,
                                 resume=_switch(config, "resume"), key="hydra.run.dir")
            except OutputError as exc:
                why = str(exc.strerror)
        if why:
            print(f"error: {why}", file=sys.stderr)
            sys.exit(2)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra has un-set HydraConfig by now; run_job recorded the run's output dir on `config`.
        _finish(Path(config.hydra.runtime.output_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _finish(Path(config.hydra.sweep.dir))


def _finish(root: Path) -> None:
    global collect_error
    try:
        summarize(_collect(root))
    except OutputError as exc:  # the parts stay; sweep.py reports it and exits 1
        collect_error = str(exc.strerror)
    except CollectRefused as exc:  # never at a sweep's own end (it has multirun.yaml); a safety net
        collect_error = str(exc)
