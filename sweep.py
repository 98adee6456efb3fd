"""memsweep sweep entry: `python sweep.py -m seq=512,2048,8192 dtype=fp16,bf16`.

Thin on purpose: Hydra composes the config, memsweep.app does the rest. Exit status: 0 when
every job ran (ok, oom and skipped are results), 1 when any job failed (status=error, the table
is still written), 2 for bad input found before any job ran.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout even before `pip install -e .`

import hydra  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from memsweep.app import callbacks, job  # noqa: E402
from memsweep.app.cli import (  # noqa: E402
    check_overrides, check_writable, grid_subdir, output_dir, without_null_options,
)
from memsweep.errors import ConfigError  # noqa: E402
from memsweep.results import OutputError  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> int:
    return job.run_job(cfg)


def run(argv: list[str]) -> int:
    try:
        check_overrides(argv, ROOT / "conf")
        argv = without_null_options(argv)
        check_writable(*output_dir(argv))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0], *argv, *grid_subdir(argv)]
    os.environ[job.SWEEP_PID_ENV] = str(os.getpid())  # workers exit when this process is gone
    user_full_error = "HYDRA_FULL_ERROR" in os.environ
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra's errors reach us, to print in one line
    try:
        main()
    except OSError as exc:  # disk full / read-only mid-run (Hydra's own config save): parts stay
        key, out = output_dir(argv)
        what = exc.strerror if isinstance(exc, OutputError) else (
            f"cannot write {exc.filename or f'{key}={str(out)!r}'}: {exc.strerror or exc}")
        print(f"error: {what}; the parts written so far are kept (python scripts/collect.py DIR "
              f"rebuilds results.parquet)", file=sys.stderr)
        return 1
    except (HydraException, OmegaConfBaseException, ValueError, TypeError) as exc:  # Hydra refusing input
        if user_full_error:
            raise
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    if job.last_exit_code:  # a single run: its own error line is out already
        return job.last_exit_code
    if callbacks.failed_jobs:
        print(f"error: {callbacks.failed_jobs} job(s) failed (status=error); their rows are in the table",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
