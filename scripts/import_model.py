"""Import a Hugging Face model as a preset: `python scripts/import_model.py path/to/config.json`.

Thin on purpose: memsweep.app.import_cli is the command (also `memsweep import PATH`); see it for
the options (--name, --conf-dir, --force, --print).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without install

from memsweep.app.import_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="import_model.py"))
