"""Hydra glue of `scripts/plan.py`: the plan config becomes a `PlanSpec`, the core does the rest.

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

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from memsweep.app.cli import override_value, parse_overrides
from memsweep.errors import ConfigError
from memsweep.plan import PLAN_KEYS, make_plan, plan_spec_from_dict, render_markdown, write_outputs
from memsweep.presets import CONF_DIR

CONFIG_NAME = "plan"
CONFIG_FILE = CONF_DIR / "plan.yaml"
LAYOUT_KEYS = ("tp", "dp", "zero")

# Exit status of the run, for scripts/plan.py to return to the shell.
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
    print(render_markdown(plan))
    for p in paths.values():
        print(f"wrote {p}")
    print(f"planned {plan.table.height} rows in {time.perf_counter() - start:.1f} s")
    last_exit_code = 0
    return 0
