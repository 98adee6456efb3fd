"""Capacity planning tables: `python scripts/plan.py models=[llama3-8b] hardware=[h100-80g] seqs=[2048]`.

Thin on purpose: conf/plan.yaml is the config (registered by memsweep.app.plan_cli, which says
why), memsweep.plan does the work. Writes plan.parquet, plan.md and plan.png into
outputs/plan/<time>/ (or `hydra.run.dir=...`) and prints plan.md. Never imports torch.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout even before `pip install -e .`

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from memsweep.app import plan_cli  # noqa: E402
from memsweep.errors import ConfigError  # noqa: E402

plan_cli.register()


@hydra.main(version_base="1.3", config_path=None, config_name="plan")
def main(cfg: DictConfig) -> int:
    return plan_cli.run(cfg)


if __name__ == "__main__":
    try:
        plan_cli.check_overrides(sys.argv[1:])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
    sys.exit(plan_cli.last_exit_code)
