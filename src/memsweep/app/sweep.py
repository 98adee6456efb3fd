"""The sweep app: `memsweep -m seq=512,2048 dtype=fp16,bf16`, the same as `python sweep.py ...`.

Hydra composes the config from the presets (`memsweep.presets.CONF_DIR`: the checkout's conf/, or
the copy an installed package ships), `job.run_job` runs each job, the callbacks collect. Exit
status: 0 when every job ran (ok, oom and skipped are results), 1 when any job failed
(status=error, the table is still written), 2 for bad input found before any job ran.

This module is named `sweep` on purpose: Hydra names the job after the file of its task
function, so a run's log stays `sweep.log` whichever entry started it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from memsweep.app import callbacks, job
from memsweep.app.cli import (
    check_overrides, check_writable, default_choices, grid_subdir, output_dir, override_values, parse_overrides,
    split_argv, user_conf_dirs, without_null_options,
)
from memsweep.errors import ConfigError
from memsweep.presets import CONF_DIR
from memsweep.results import OutputError


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> int:
    return job.run_job(cfg)


def register_plugins() -> None:
    """memsweep's Hydra plugins (hydra/launcher=batched, hydra/sweeper=memsweep), registered by
    hand too: Hydra finds plugins by listing the `hydra_plugins` namespace, and in an editable
    install setuptools' import hook lists none of its modules there."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()  # first: its scan re-runs the module of the basic sweeper ours extends
    try:
        from hydra_plugins.memsweep_batched_launcher import batched_launcher as plugin
    except ImportError:  # no hydra_plugins at all: Hydra says which config it cannot load
        return
    for cls in (plugin.BatchedLauncher, plugin.MemsweepSweeper):
        plugins.register(cls)


def measure_backends(argv: list[str], conf_dir: Path = CONF_DIR) -> list[tuple[str, str]]:
    """(what the command line says, backend) for every measure option its jobs may run: the
    `measure=` choices (a sweep's every value; else config.yaml's default) with their presets'
    `backend`, or `measure.backend=` itself. [] where Hydra alone can tell (a glob, a range)."""

    def values(o) -> list[str]:
        return [str(v) for v in override_values(o) or ()]  # glob(), range(): Hydra expands them

    overrides = [o for o in parse_overrides(argv) if not o.is_delete()]
    backend = next((o for o in overrides if o.key_or_group == "measure.backend"), None)
    if backend is not None:
        return [(f"measure.backend={v}", v) for v in values(backend)]
    group = next((o for o in overrides if o.key_or_group == "measure"), None)
    options = values(group) if group is not None else [default_choices(conf_dir).get("measure", "none")]
    out = []
    for name in options:
        path = next((d / "measure" / f"{name}.yaml" for d in (*user_conf_dirs(argv), conf_dir)
                     if (d / "measure" / f"{name}.yaml").is_file()), None)
        if path is not None:
            out.append((f"measure={name}", str(OmegaConf.load(path).get("backend", name))))
    return out


def check_torch(argv: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """One error line when a job of this command would measure (measure=fake|cpu|cuda) and torch is
    not installed: said once, before any job, instead of as every job's error row. None otherwise
    (and for `--cfg`, which prints the config and runs nothing)."""
    if "--cfg" in split_argv(argv)[0] or importlib.util.find_spec("torch") is not None:
        return None
    needs = [typed for typed, backend in measure_backends(argv, conf_dir) if backend != "none"]
    if not needs:
        return None
    return (f"error: {', '.join(needs)}: needs torch (pip install \"memsweep[measure]\"); allowed: measure=none "
            "(the analytic estimates) until torch is installed")


def run(argv: list[str]) -> int:
    """Run the sweep (or one job, without -m) for a command line of Hydra overrides and flags."""
    try:
        check_overrides(argv, CONF_DIR)
        argv = without_null_options(argv)
        if (missing := check_torch(argv)) is not None:
            print(missing, file=sys.stderr)
            return 2
        check_writable(*output_dir(argv))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    job.last_exit_code, callbacks.failed_jobs, callbacks.collect_error = 0, 0, None  # a second run starts clean
    register_plugins()
    sys.argv = [sys.argv[0], *argv, *grid_subdir(argv)]
    os.environ[job.SWEEP_PID_ENV] = str(os.getpid())  # workers exit when this process is gone
    user_full_error = "HYDRA_FULL_ERROR" in os.environ
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra's errors reach us, to print in one line
    try:
        hydra_main()
    except HydraException as exc:  # Hydra refusing input (a missing config is an OSError too)
        if user_full_error:
            raise
        first = str(exc).strip().splitlines()[0]
        if "Could not load 'hydra/launcher/" in first:  # a launcher option, its plugin not installed
            first = f"{first.rstrip('.')}; the launchers need: pip install 'memsweep[launchers]'"
        print(f"error: {first}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full / read-only mid-run (Hydra's own config save): parts stay
        key, out = output_dir(argv)
        what = exc.strerror if isinstance(exc, OutputError) else (
            f"cannot write {exc.filename or f'{key}={str(out)!r}'}: {exc.strerror or exc}")
        print(f"error: {what}; the parts written so far are kept (memsweep collect DIR, or python "
              f"scripts/collect.py DIR, rebuilds results.parquet)", file=sys.stderr)
        return 1
    except (OmegaConfBaseException, ValueError, TypeError) as exc:  # OmegaConf refusing input
        if user_full_error:
            raise
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        if not user_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    if callbacks.collect_error:  # the table could not be written (disk full): the parts are kept
        print(f"error: {callbacks.collect_error}; the parts written so far are kept (memsweep collect DIR, or "
              f"python scripts/collect.py DIR, rebuilds results.parquet)", file=sys.stderr)
        return 1
    if job.last_exit_code:  # a single run: its own error line is out already
        return job.last_exit_code
    if callbacks.failed_jobs:
        print(f"error: {callbacks.failed_jobs} job(s) failed (status=error); their rows are in the table",
              file=sys.stderr)
        return 1
    return 0
