"""Which formula to trust, and refit its constants: `python scripts/fit.py PATH... [--calibrate]`.

Thin on purpose: memsweep.app.fit_cli is the command (also `memsweep fit ...`); its docstring, and
`--help`, say what it writes and how calibration is judged.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without install

from memsweep.app.fit_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
