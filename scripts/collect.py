"""Re-collect a sweep directory into `results.parquet`: `python scripts/collect.py DIR [DIR ...]`.

Works on finished and interrupted sweeps alike: every finished part is read, temporary files
are ignored, corrupt parts are reported and skipped, and jobs that left no rows are counted.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memsweep.results import collect, summarize  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run directories")
    args = parser.parse_args(argv)
    for d in args.dirs:
        if not d.is_dir():
            print(f"error: DIR={str(d)!r}: not a directory; allowed: a sweep or run directory", file=sys.stderr)
            return 2
        summarize(collect(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
