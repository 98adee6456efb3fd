"""memsweep sweep entry: `python sweep.py -m seq=512,2048,8192 dtype=fp16,bf16`.

Thin on purpose: Hydra composes the config, memsweep.app does the rest (memsweep.app.sweep is
the app; an installed memsweep runs the same as the `memsweep` command). `--help` lists the
config groups, their options and the top-level keys. Exit status: 0 when every job ran (ok, oom
and skipped are results), 1 when any job failed (status=error, the table is still written), 2 for
bad input found before any job ran.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # runs from a checkout even before `pip install -e .`

from memsweep.app.main import sweep  # noqa: E402

if __name__ == "__main__":
    sys.exit(sweep(sys.argv[1:], prog="python sweep.py"))
