"""Import a Hugging Face model as a preset: `memsweep import PATH` (or `python scripts/import_model.py PATH`).

    memsweep import ~/ckpt/my-model                 # a snapshot folder holding config.json
    memsweep import config.json --name my-model     # -> <conf>/model/my-model.yaml
    memsweep import config.json --print             # show the preset, write nothing

Only the local file is read (no network, no transformers). The preset lands in `<conf>/model/`:
`--conf-dir`, else `$MEMSWEEP_CONF`, else the checkout's conf/ when memsweep runs from a checkout,
else ./conf in the current directory (an installed package's presets are not yours to change;
sweep it with `memsweep --config-dir conf model=NAME`). An existing preset is kept unless --force.
The parameter count is printed (total and, for mixture-of-experts models, active per token), to
compare with the model card; keys no transformers config class has are listed in one warning line.
To sweep a config.json without writing a preset: `memsweep model=hf model.config=PATH`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from memsweep.errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_conf_dir() -> tuple[Path, bool]:
    """(where presets go, whether the sweep reads it without --config-dir): the sweep's own
    presets (`presets.conf_dir`) unless they are an installed package's, else ./conf."""
    from memsweep import presets

    if os.environ.get("MEMSWEEP_CONF") or presets.checkout_conf():
        return presets.conf_dir(), True
    return Path.cwd() / "conf", False


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from memsweep.estimate import model_summary
    from memsweep.hf_config import config_path, default_name, preset_yaml, spec_from_file
    from memsweep.results import write_text_atomic

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a config.json, or a folder holding one")
    parser.add_argument("--name", help="preset name (default: the folder's name): letters, digits, '.', '-', '_'")
    parser.add_argument("--conf-dir", type=Path, default=None, help="the conf folder whose model/ gets the preset")
    parser.add_argument("--force", action="store_true", help="replace an existing preset")
    parser.add_argument("--print", dest="show", action="store_true", help="print the preset only")
    args = parser.parse_args(argv)
    try:
        name = args.name if args.name is not None else default_name(args.config)
        if not NAME.match(name):
            raise ConfigError("--name", name, "letters, digits, '.', '-' and '_', starting with a letter or digit "
                                              "(a preset file name, never a path)")
        spec = spec_from_file(args.config, name)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s = model_summary(spec)
    count = f"{s['params']:,} parameters"
    if s["active_params"] != s["params"]:
        count += f" ({s['active_params']:,} active per token)"
    text = preset_yaml(spec, [f"Imported from {config_path(args.config)} by memsweep import: {count}"])
    if args.show:
        print(text, end="")
        return 0
    conf, read_by_default = (args.conf_dir, args.conf_dir is None) if args.conf_dir else default_conf_dir()
    out = conf / "model" / f"{name}.yaml"
    if out.exists() and not args.force:
        print(f"error: --name={name!r}: {out} exists; allowed: a new name, or --force to replace it",
              file=sys.stderr)
        return 2
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(text, out)
    except OSError as exc:
        print(f"error: --conf-dir={str(conf)!r}: cannot write {out} ({exc.strerror or type(exc).__name__}); "
              "allowed: a writable folder", file=sys.stderr)
        return 2
    print(f"{out}: {name}, {count}")
    if read_by_default:
        print(f"sweep it: memsweep model={name}   (or: python sweep.py model={name})")
    else:
        print(f"sweep it: memsweep --config-dir {conf} model={name}")
    return 0
