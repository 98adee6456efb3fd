"""Sweep overhead: memsweep's per-job cost against a no-op Hydra app, and collection speed.

    python scripts/bench_sweep.py

1. The same 100-job grid (seq x batch) run twice through Hydra's basic launcher, in one run of
   this script: by `sweep.py` (analytic: five formulas per job, an atomic part per job,
   collection at the end) and by a no-op app with the same config and Hydra settings (no
   callbacks, no work). The ratio of wall times is memsweep's overhead (goal <= 1.1).
2. `collect` over 10,000 parts of 5 rows each (a large sweep), timed.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GRID = ["seq=" + ",".join(str(128 * i) for i in range(1, 11)), "batch=" + ",".join(map(str, range(1, 11)))]

NOOP_APP = '''
import hydra

@hydra.main(version_base="1.3", config_path={conf!r}, config_name="config")
def main(cfg):
    return 0

if __name__ == "__main__":
    main()
'''


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - t0


def bench_sweep(tmp: Path) -> None:
    noop = tmp / "noop_app.py"
    noop.write_text(NOOP_APP.format(conf=str(ROOT / "conf")))
    base = ["-m", *GRID, "hydra/launcher=basic"]
    t_noop = timed([sys.executable, str(noop), *base, "~hydra.callbacks.collect", f"hydra.sweep.dir={tmp / 'noop'}"])
    t_ours = timed([sys.executable, str(ROOT / "sweep.py"), *base, f"hydra.sweep.dir={tmp / 'ours'}"])
    print(f"sweep of 100 jobs:  no-op Hydra app {t_noop:6.2f} s ({1000 * t_noop / 100:5.1f} ms/job)   "
          f"memsweep {t_ours:6.2f} s ({1000 * t_ours / 100:5.1f} ms/job)   ratio {t_ours / t_noop:.3f}")


def bench_collect(tmp: Path, parts: int = 10_000) -> None:
    import polars as pl

    from memsweep.estimate import estimate_rows
    from memsweep.formulas import FORMULAS
    from memsweep.presets import job_spec
    from memsweep.results import PART_NAME, collect, frame

    df = frame(estimate_rows(job_spec("llama2-7b"), list(FORMULAS.values())))
    t0 = time.perf_counter()
    for i in range(parts):
        d = tmp / "many" / str(i)
        d.mkdir(parents=True)
        df.with_columns(pl.lit(i).alias("job_num"), pl.lit(f"id{i}").alias("job_id")).write_parquet(d / PART_NAME)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = collect(tmp / "many")
    t_collect = time.perf_counter() - t0
    print(f"collect of {parts:,} parts ({got.table.height:,} rows): {t_collect:6.2f} s "
          f"({1e6 * t_collect / parts:5.0f} us/part; writing them took {t_write:.1f} s)")


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bench_sweep(tmp)
        bench_collect(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
