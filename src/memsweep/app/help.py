"""`memsweep --help` (and `python sweep.py --help`): the config groups with their options and the
top-level keys, one line each, read straight from the preset files (no Hydra composition, so it
answers at once). An option's line is the first sentence of its YAML's leading comment; a key's,
its trailing comment in config.yaml. Lines longer than the terminal drop parentheses, then end in …"""

from __future__ import annotations

import re
import shutil
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


def fit(text: str, width: int) -> str:
    """One line of at most `width` characters: parentheses go, the last first, then the tail '…'."""
    while len(text) > width and (m := list(re.finditer(r"\s*\([^()]*\)", text))):
        text = text[: m[-1].start()] + text[m[-1].end():]
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


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


def help_text(conf_dir: Path, prog: str = "memsweep", width: int | None = None) -> str:
    width = width or max(80, min(shutil.get_terminal_size((100, 24)).columns, 140))
    chosen = defaults(conf_dir / "config.yaml")
    lines = [
        f"usage: {prog} [-m] [GROUP=OPTION ...] [KEY=VALUE ...] [hydra flags]",
        *([f"       {prog} plan|fit|collect ..."] if prog == "memsweep" else []),
        "",
        "Sweep GPU-memory formulas over a grid of configurations: one Hydra job per point, every",
        "estimator side by side, one row per job x formula in results.parquet.",
        "",
        f"  {prog} model=llama3-8b seq=4096                  one job, into outputs/runs/<time>/",
        f"  {prog} -m seq=512,2048,8192 dtype=fp16,bf16      a multirun grid, into outputs/multirun/<time>/",
        "",
    ]
    if prog == "memsweep":
        lines += [
            "Subcommands (each takes --help):",
            "  plan KEY=VALUE ...           capacity planning: largest batch, longest seq, fewest GPUs",
            "  fit PATH ... [--calibrate]   error tables and calibrated constants from measured sweeps",
            "  collect DIR ...              re-collect a sweep directory into results.parquet",
            "",
        ]
    lines.append(f"Config groups (GROUP=OPTION; a sweep: GROUP=a,b; presets in {conf_dir}):")
    groups = [g for g in GROUP_ORDER if (conf_dir / g).is_dir()]
    groups += sorted(p.name for p in conf_dir.iterdir() if p.is_dir() and p.name not in GROUP_ORDER
                     and p.name != "hydra" and not p.name.startswith((".", "_")))
    for group in groups:
        default = chosen.get(group)
        default = "none" if default == "null" else default
        lines.append(f"  {group}" + (f"   (default: {default})" if default else ""))
        options = sorted((conf_dir / group).glob("*.yaml"))
        name_w = max((len(p.stem) for p in options), default=0) + 2
        for p in options:
            lines.append(fit(f"    {p.stem:<{name_w}}{first_comment(p)}".rstrip(), width))
    lines += ["", "Top-level keys (KEY=VALUE; any preset field too: model.layers=48, workload.lora_rank=64):"]
    keys = top_level_keys(conf_dir / "config.yaml")
    key_w = max(len(f"{k}={v}") for k, v, _ in keys) + 2
    for key, value, comment in keys:
        shown = f"{key}={value}" if value else key
        lines.append(fit(f"  {shown:<{key_w}}{comment}".rstrip(), width))
    lines += [
        "",
        "Also: --cfg job prints the composed config; --hydra-help, Hydra's own flags. The launchers need",
        "pip install 'memsweep[launchers]', measure=fake|cpu|cuda needs 'memsweep[measure]' (torch).",
    ]
    return "\n".join(lines)
