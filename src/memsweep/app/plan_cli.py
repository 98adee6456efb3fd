"""The planner's command, `memsweep plan KEY=VALUE ...` (or `python scripts/plan.py ...`): the plan
config becomes a `PlanSpec`, the core does the rest.

Why the config is registered in the ConfigStore instead of read from `conf/` as a search path:
`conf/` holds config groups named `hardware`, `formula`, `optimizer` and `parallel`, and with it
on the search path Hydra reads `hardware=[a100-80g,h100-80g]` as a choice of that group ("No match
in the defaults list"). Registered as a node, conf/plan.yaml is still the one source of the
defaults, and those keys are plain values, overridable like any other.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from memsweep.app.cli import check_writable, override_value, parse_overrides
from memsweep.errors import ConfigError
from memsweep.plan import PLAN_KEYS, make_plan, plan_spec_from_dict, render_markdown, write_outputs
from memsweep.plan.spec import LAYOUT_KEYS
from memsweep.presets import CONF_DIR
from memsweep.results import OutputError

CONFIG_NAME = "plan"
CONFIG_FILE = CONF_DIR / "plan.yaml"

# Exit status of the run, for `main` to return to the shell.
last_exit_code = 0


def register(path: Path = CONFIG_FILE) -> None:
    ConfigStore.instance().store(name=CONFIG_NAME, node=OmegaConf.load(path))


def check_overrides(argv: list[str]) -> None:
    """A misspelt key (`model=x`, `margn=0.1`) fails with one line before Hydra composes."""
    for o in parse_overrides(argv):
        key = o.key_or_group
        if key.startswith("hydra") or o.is_add() or o.is_force_add():
            continue
        top, _, rest = key.partition(".")
        if top not in PLAN_KEYS or (rest and (top != "layouts" or rest not in LAYOUT_KEYS)):
            allowed = [*PLAN_KEYS, *(f"layouts.{k}" for k in LAYOUT_KEYS)]
            raise ConfigError(key, override_value(o), f"plan keys: {', '.join(allowed)}")


def output_dir(argv: list[str]) -> tuple[str, Path]:
    """The key and the directory the plan is written to: hydra.run.dir as given, else what is fixed
    of it (the part before its first `${`: outputs/plan/ from conf/plan.yaml, whose leaf is a timestamp)."""
    key = "hydra.run.dir"
    given = [o for o in parse_overrides(argv) if o.key_or_group == key and not o.is_delete()]
    if given and "${" not in given[-1].input_line:
        value = given[-1].value()
        return key, Path(value if isinstance(value, str) else override_value(given[-1]))
    value = given[-1].input_line.split("=", 1)[-1] if given else str(
        OmegaConf.to_container(OmegaConf.load(CONFIG_FILE).hydra.run)["dir"])
    return key, Path(value.split("${", 1)[0] or ".")


def run(cfg: DictConfig) -> int:
    """Plan, write plan.parquet / plan.md / plan.png into the run directory, print plan.md."""
    global last_exit_code
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
        start = time.perf_counter()
        plan = make_plan(plan_spec_from_dict(values))
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        paths = write_outputs(plan, out_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        last_exit_code = 2
        return 2
    except OutputError as exc:  # disk full or read-only meanwhile: one line naming the file
        print(f"error: {exc.strerror}", file=sys.stderr)
        last_exit_code = 1
        return 1
    print(render_markdown(plan))
    for p in paths.values():
        print(f"wrote {p}")
    print(f"planned {plan.table.height} rows in {time.perf_counter() - start:.1f} s")
    last_exit_code = 0
    return 0


@hydra.main(version_base="1.3", config_path=None, config_name=CONFIG_NAME)
def hydra_main(cfg: DictConfig) -> int:
    return run(cfg)


def usage(prog: str) -> str:
    """--help: the plan config itself, whose comments say what every key means."""
    text = CONFIG_FILE.read_text().split("\nhydra:")[0].rstrip()
    return (f"usage: {prog} [KEY=VALUE ...] [hydra.run.dir=DIR]\n\n"
            f"Every key of {CONFIG_FILE} can be overridden (lists: models=[llama3-8b,mistral-7b]):\n\n{text}")


def main(argv: list[str] | None = None, prog: str = "memsweep plan") -> int:
    """Plan for a command line of overrides; 0 done, 2 bad input (one `error:` line)."""
    global last_exit_code
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ask"]:  # one question, one sentence (memsweep.plan.ask; no Hydra)
        from memsweep.plan import ask

        return ask.main(argv[1:], prog=f"{prog} ask")
    if "--help" in argv or "-h" in argv:
        print(usage(prog))
        return 0
    try:
        check_overrides(argv)
        check_writable(*output_dir(argv))  # the sweep's check: Hydra would fail later with a traceback
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    register()
    named = any(a.startswith("hydra.job.name=") for a in argv)
    # Hydra names the job (and its log file) after this module; keep the planner's name, plan.log
    sys.argv = [sys.argv[0], *argv, *([] if named else ["hydra.job.name=plan"])]
    last_exit_code = 0
    hydra_main()
    return last_exit_code
