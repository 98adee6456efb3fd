"""The `memsweep` command (pyproject.toml's [project.scripts]; also `python -m memsweep.app.main`).

    memsweep [-m] OVERRIDES...     the sweep, exactly `python sweep.py [-m] OVERRIDES...`
    memsweep plan KEY=VALUE ...    capacity planning, exactly `python scripts/plan.py ...`
    memsweep fit PATH ...          error tables and calibration, exactly `python scripts/fit.py ...`
    memsweep collect DIR ...       re-collect a sweep, exactly `python scripts/collect.py ...`
    memsweep import PATH ...       a config.json as a preset, exactly `python scripts/import_model.py ...`
    memsweep --help                the config groups, their options and the top-level keys

Exit status: 0 ok, 1 failed jobs (their rows are in the table), 2 bad input (one `error:` line).
Only the chosen command's modules are imported: `--help` composes nothing and runs no Hydra.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

HELP_FLAGS = ("--help", "-h")


def _plan(argv: list[str]) -> int:
    if argv[:1] == ["ask"]:  # answers in about half a second: no Hydra to import
        from memsweep.plan import ask

        return ask.main(argv[1:], prog="memsweep plan ask")
    from memsweep.app import plan_cli

    return plan_cli.main(argv, prog="memsweep plan")


def _fit(argv: list[str]) -> int:
    from memsweep.app import fit_cli

    return fit_cli.main(argv, prog="memsweep fit")


def _collect(argv: list[str]) -> int:
    from memsweep.app import collect_cli

    return collect_cli.main(argv, prog="memsweep collect")


def _import(argv: list[str]) -> int:
    from memsweep.app import import_cli

    return import_cli.main(argv, prog="memsweep import")


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {"plan": _plan, "fit": _fit, "collect": _collect,
                                                      "import": _import}


def sweep(argv: list[str], prog: str = "memsweep") -> int:
    """The sweep app, with memsweep's own --help (`python sweep.py` calls this too)."""
    if any(a in HELP_FLAGS for a in argv):
        from memsweep.app.help import help_text
        from memsweep.presets import CONF_DIR

        print(help_text(CONF_DIR, prog=prog))
        return 0
    from memsweep.app.sweep import run

    return run(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    return sweep(argv)


def cli() -> None:
    """The console script's entry point."""
    try:
        code = main()
    except BrokenPipeError:  # `memsweep --help | head`: the reader left, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    cli()
