"""Regenerate the config.json corpus's derived files from transformers: `python scripts/hf_corpus.py`
(needs the `hf` extra: transformers==5.23.0).

For each real config.json in tests/data/hf_configs/ (the files as their hubs ship them: what
`save_pretrained` writes, only the keys that differ from PretrainedConfig's defaults, or older
saves), this writes
- `full/NAME.json`: the same config as transformers' `to_dict()` writes it (every key of the class,
  generic ones included: what sub-configs of multimodal models, several training tools and older
  saves contain), and
- `../hf_config_counts.json`: {NAME: the parameter count of transformers' model of it}, built on the meta device
  (a multimodal config's language model and lm_head, without the vision tower).

tests/test_hf_config.py imports both forms and compares them with these counts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from memsweep.results import write_text_atomic  # noqa: E402

DATA = ROOT / "tests" / "data" / "hf_configs"


def full_form(cfg: dict) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoConfig.for_model(**cfg).to_dict()


def main() -> int:
    from memsweep.hf_keys import transformers_count

    counts = {}
    (DATA / "full").mkdir(exist_ok=True)
    for path in sorted(DATA.glob("*.json")):
        cfg = json.loads(path.read_text())
        full = full_form(cfg)
        write_text_atomic(json.dumps(full, indent=2, default=str) + "\n", DATA / "full" / path.name)
        counts[path.stem] = transformers_count(cfg)
        print(f"{path.stem}: {counts[path.stem]:,}")
    write_text_atomic(json.dumps(counts, indent=1) + "\n", DATA.parent / "hf_config_counts.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
