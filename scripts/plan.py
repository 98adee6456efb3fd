"""Capacity planning tables: `python scripts/plan.py models=[llama3-8b] hardware=[h100-80g] seqs=[2048]`.

Thin on purpose: memsweep.app.plan_cli is the command (also `memsweep plan ...`; conf/plan.yaml
is its config), memsweep.plan does the work. Writes plan.parquet, plan.md and plan.png into
outputs/plan/<time>/ (or `hydra.run.dir=...`) and prints plan.md. Never imports torch.
Exit status: 0 done, 2 bad input (one `error:` line).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without install

if __name__ == "__main__" and sys.argv[1:2] == ["ask"]:  # one sentence, no Hydra to import
    from memsweep.plan import ask  # noqa: E402

    sys.exit(ask.main(sys.argv[2:], prog="python scripts/plan.py ask"))

from memsweep.app import plan_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(plan_cli.main(sys.argv[1:], prog="python scripts/plan.py"))
