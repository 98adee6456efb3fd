"""`memsweep --help` (and `python sweep.py --help`): the config groups with their options and the
top-level keys, one entry each, read straight from the preset files (no Hydra composition, so it
answers at once). An option's entry is the first sentence of its YAML's leading comment; a key's,
its trailing comment in config.yaml. An entry longer than the terminal wraps at a word onto lines
indented under its text: nothing is cut (a cut entry once ended `margin`'s help mid-formula)."""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

GROUP_ORDER = ("model", "workload", "optimizer", "hardware", "parallel", "measure", "formula", "hydra/launcher")


def first_comment(path: Path) -> str:
    """The YAML's leading comment up to its first sentence end (a comment wrapped over lines is
    joined; a line ending in ':' ends it, without the ':'); '' when the file starts with data."""
    parts: list[str] = []
    for line in path.read_text().splitlines():
        s = line.strip()
        if not s.startswith("#"):
            break
        text = s.lstrip("#")
        if parts and (text.startswith("  ") or not text.strip()):  # an indented example, a blank
            break
        parts.append(text.strip())
        if parts[-1].endswith((".", ":")):
            break
    text = " ".join(p for p in parts if p)
    for m in re.finditer(r"(\S+)\. ", text):  # the first sentence; "et al." and "e.g." go on
        if m.group(1).lower() not in ("al", "e.g", "i.e", "etc", "vs", "cf"):
            text = text[: m.start() + len(m.group(1))]
            break
    return text.rstrip(":")


def fit(prefix: str, text: str, width: int) -> list[str]:
    """`prefix` + `text` in lines of at most `width` characters, broken between words, the lines
    after the first indented to where `text` starts. Nothing is dropped: a word longer than a line
    (a path) overflows rather than being cut."""
    if not text:
        return [prefix.rstrip()]
    return textwrap.wrap(text, width=width, initial_indent=prefix, subsequent_indent=" " * len(prefix),
                         break_long_words=False, break_on_hyphens=False)


def top_level_keys(config: Path) -> list[tuple[str, str, str]]:
    """(key, default, comment) for each key of config.yaml outside `defaults` and `hydra`; the
    keys of a nested mapping (`offload.optimizer`) follow their parent."""
    out: list[tuple[str, str, str]] = []
    parent, skip = "", False
    for line in config.read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z_][\w-]*):\s*([^#]*?)\s*(?:#\s*(.*))?$", line)
        if not m:
            continue
        indent, key, value, comment = m.groups()
        if not indent:
            skip = key in ("defaults", "hydra")
            parent = key
            if not skip:
                out.append((key, value, comment or ""))
        elif not skip and len(indent) <= 2:
            out.append((f"{parent}.{key}", value, comment or ""))
    return out


def defaults(config: Path) -> dict[str, str]:
    """The options config.yaml's defaults list chooses (`model: llama2-7b`, `override hydra/launcher: batched`)."""
    chosen, inside = {}, False
    for line in config.read_text().splitlines():
        if re.match(r"^defaults:", line):
            inside = True
        elif inside and (m := re.match(r"^\s*-\s*(?:override\s+)?([\w/]+):\s*([\w.-]+)", line)):
            chosen[m.group(1)] = m.group(2)
        elif inside and line and not line.startswith((" ", "#")):
            break
    return chosen


def paragraph(text: str, width: int) -> list[str]:
    """Prose in lines of at most `width` characters, broken between words."""
    return textwrap.wrap(text, width=width, break_long_words=False, break_on_hyphens=False)


def entries(rows: list[tuple[str, str]], indent: int, width: int) -> list[str]:
    """(name, text) rows as aligned entries: `text` starts one column for all, wrapped under itself."""
    name_w = max((len(n) for n, _ in rows), default=0) + 2
    return [line for name, text in rows for line in fit(f"{' ' * indent}{name:<{name_w}}", text, width)]


def help_text(conf_dir: Path, prog: str = "memsweep", width: int | None = None) -> str:
    """The listing, every line at most `width` characters (default: the terminal's, 80 to 140)
    and none cut: an entry wraps under its own text."""
    width = width or max(80, min(shutil.get_terminal_size((100, 24)).columns, 140))
    chosen = defaults(conf_dir / "config.yaml")
    lines = [
        f"usage: {prog} [-m] [GROUP=OPTION ...] [KEY=VALUE ...] [hydra flags]",
        *([f"       {prog} plan|fit|collect|import ..."] if prog == "memsweep" else []),
        "",
        *paragraph("Sweep GPU-memory formulas over a grid of configurations: one Hydra job per point, every "
                   "estimator side by side, one row per job x formula in results.parquet.", width),
        "",
        *entries([(f"{prog} model=llama3-8b seq=4096", "one job, into outputs/runs/<time>/"),
                  (f"{prog} -m seq=512,2048,8192 dtype=fp16,bf16", "a multirun grid, into outputs/multirun/<time>/")],
                 2, width),
        "",
    ]
    if prog == "memsweep":
        lines += ["Subcommands (each takes --help):"]
        lines += entries([("plan KEY=VALUE ...", "capacity planning: largest batch, longest seq, fewest GPUs"),
                          ("fit PATH ... [--calibrate]", "error tables and calibrated constants from measured sweeps"),
                          ("collect DIR ...", "re-collect a sweep directory into results.parquet")], 2, width)
        lines += [""]
    lines += paragraph(f"Config groups (GROUP=OPTION; a sweep: GROUP=a,b; presets in {conf_dir}):", width)
    groups = [g for g in GROUP_ORDER if (conf_dir / g).is_dir()]
    groups += sorted(p.name for p in conf_dir.iterdir() if p.is_dir() and p.name not in GROUP_ORDER
                     and p.name != "hydra" and not p.name.startswith((".", "_")))
    for group in groups:
        default = chosen.get(group)
        default = "none" if default == "null" else default
        lines.append(f"  {group}" + (f"   (default: {default})" if default else ""))
        lines += entries([(p.stem, first_comment(p)) for p in sorted((conf_dir / group).glob("*.yaml"))], 4, width)
    lines += ["", *paragraph("Top-level keys (KEY=VALUE; any preset field too: model.layers=48, "
                             "workload.lora_rank=64):", width)]
    lines += entries([(f"{k}={v}" if v else k, comment) for k, v, comment in top_level_keys(conf_dir / "config.yaml")],
                     2, width)
    lines += ["", *paragraph("Also: --cfg job prints the composed config; --hydra-help, Hydra's own flags. The "
                             "launchers need pip install 'memsweep[launchers]', measure=fake|cpu|cuda needs "
                             "'memsweep[measure]' (torch).", width)]
    return "\n".join(lines)
