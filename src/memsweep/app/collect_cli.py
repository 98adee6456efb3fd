"""Re-collect a sweep directory into `results.parquet`: `memsweep collect [--merge] DIR [DIR ...]`
(or `python scripts/collect.py DIR ...`).

Works on finished and interrupted sweeps alike: every finished part is read, temp files of
killed writes are removed (memsweep's own, where memsweep writes them; nothing else), corrupt
parts and parts memsweep did not write are reported and skipped, and jobs that left no rows are
counted. An existing results.parquet is never replaced by a table with less in it (a job or an ok
row it has and the parts lack), nor when memsweep did not write it: it is kept, and the exit
status is 2.

A DIR must be a sweep or run directory (results.sweep_markers: what Hydra and memsweep leave in it
or right under it); anything else, a folder of several sweeps (or rows of several sweep ids)
without --merge, or a directory with no part to collect, is a one-line error with exit status 2,
checked for every DIR before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from memsweep.results import CollectRefused, OutputError, check_collectable, collect, summarize

DESCRIPTION = "Re-collect sweep (or run) directories into results.parquet, also interrupted ones."


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--merge", action="store_true",
                        help="merge the rows of several sweeps (different sweep_id, or sweep directories side by "
                             "side in DIR) into one table; without it such a DIR is refused")
    args = parser.parse_args(argv)
    try:  # every DIR first: a bad one leaves the others untouched too
        for d in args.dirs:
            if not d.is_dir():
                print(f"error: DIR={str(d)!r}: not a directory; allowed: a sweep or run directory", file=sys.stderr)
                return 2
            check_collectable(d, merge=args.merge)
    except CollectRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    code = 0
    for d in args.dirs:
        try:
            collected = collect(d, merge=args.merge, need_rows=True)
        except CollectRefused as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OutputError as exc:
            print(f"error: {exc.strerror}", file=sys.stderr)
            return 1
        summarize(collected)
        if collected.kept:  # refused to replace a table with less than it had
            print(f"error: {collected.kept}", file=sys.stderr)
            code = 2
    return code
