"""Regenerate src/memsweep/data/hf_keys.json from transformers' configuration classes:
`python scripts/hf_keys.py` (needs the `hf` extra: transformers==5.23.0).

The importer reads the table without transformers (memsweep.hf_keys explains its columns);
tests/test_hf_config.py regenerates it in memory and fails when it differs from the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from memsweep.hf_keys import TABLE_PATH, build_table, dumps  # noqa: E402
from memsweep.results import write_text_atomic  # noqa: E402


def main() -> int:
    out = ROOT / "src" / "memsweep" / TABLE_PATH
    out.parent.mkdir(parents=True, exist_ok=True)
    table = build_table()
    write_text_atomic(dumps(table), out)
    keys = sum(len(v) for v in table["types"].values())
    print(f"{out}: {len(table['types'])} model types, {keys} class keys, {len(table['generic'])} generic keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
