"""memsweep sweep entry: `python sweep.py -m seq=512,2048,8192 dtype=fp16,bf16`.

Thin on purpose: Hydra composes the config, memsweep.app does the rest.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout even before `pip install -e .`

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from memsweep.app import job  # noqa: E402
from memsweep.app.cli import check_overrides  # noqa: E402
from memsweep.errors import ConfigError  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> int:
    return job.run_job(cfg)


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:], ROOT / "conf")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
    sys.exit(job.last_exit_code)
