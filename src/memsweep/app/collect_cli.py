"""Re-collect a sweep directory into `results.parquet`: `memsweep collect DIR [DIR ...]`
(or `python scripts/collect.py DIR ...`).

Works on finished and interrupted sweeps alike: every finished part is read, temp files of
killed writes are removed, corrupt parts are reported and skipped, and jobs that left no rows are
counted. An existing results.parquet is never replaced by a table with less in it (a job or an ok
row it has and the parts lack): it is kept, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from memsweep.results import OutputError, collect, summarize

DESCRIPTION = "Re-collect sweep (or run) directories into results.parquet, also interrupted ones."


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run directories")
    args = parser.parse_args(argv)
    code = 0
    for d in args.dirs:
        if not d.is_dir():
            print(f"error: DIR={str(d)!r}: not a directory; allowed: a sweep or run directory", file=sys.stderr)
            return 2
        try:
            collected = collect(d)
        except OutputError as exc:
            print(f"error: {exc.strerror}", file=sys.stderr)
            return 1
        summarize(collected)
        if collected.kept:  # refused to replace a table with less than it had
            print(f"error: {collected.kept}", file=sys.stderr)
            code = 2
    return code
