"""Import a Hugging Face model as a preset: `python scripts/import_model.py path/to/config.json`.

    python scripts/import_model.py ~/ckpt/my-model                # a snapshot folder holding config.json
    python scripts/import_model.py config.json --name my-model    # -> conf/model/my-model.yaml
    python scripts/import_model.py config.json --print            # show the preset, write nothing

Only the local file is read (no network, no transformers). The preset lands in conf/model/ (or
--conf-dir); an existing preset is kept unless --force. The parameter count is printed (total
and, for mixture-of-experts models, active per token), to compare with the model card.
To sweep a config.json without writing a preset: `python sweep.py model=hf model.config=PATH`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from memsweep.errors import ConfigError  # noqa: E402
from memsweep.estimate import model_summary  # noqa: E402
from memsweep.hf_config import config_path, default_name, preset_yaml, spec_from_file  # noqa: E402
from memsweep.results import write_text_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a config.json, or a folder holding one")
    parser.add_argument("--name", help="preset name (default: the folder's name)")
    parser.add_argument("--conf-dir", type=Path, default=ROOT / "conf", help="where conf/model/ is")
    parser.add_argument("--force", action="store_true", help="replace an existing preset")
    parser.add_argument("--print", dest="show", action="store_true", help="print the preset only")
    args = parser.parse_args(argv)
    try:
        name = args.name or default_name(args.config)
        spec = spec_from_file(args.config, name)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s = model_summary(spec)
    count = f"{s['params']:,} parameters"
    if s["active_params"] != s["params"]:
        count += f" ({s['active_params']:,} active per token)"
    text = preset_yaml(spec, [f"Imported from {config_path(args.config)} by scripts/import_model.py: {count}"])
    if args.show:
        print(text, end="")
        return 0
    out = args.conf_dir / "model" / f"{name}.yaml"
    if out.exists() and not args.force:
        print(f"error: --name={name!r}: {out} exists; allowed: a new name, or --force to replace it",
              file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(text, out)
    print(f"{out}: {name}, {count}")
    print(f"sweep it: python sweep.py model={name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
