"""Re-collect a sweep directory into `results.parquet`: `python scripts/collect.py DIR [DIR ...]`.

Thin on purpose: memsweep.app.collect_cli is the command (also `memsweep collect DIR ...`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without install

from memsweep.app.collect_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
