"""Sweep speed: the batched launcher against the basic one, Hydra's compose-only floor and the
vectorized evaluator; then collection speed.

    python scripts/bench_sweep.py            # about 3 minutes on 2 cores
    python scripts/bench_sweep.py --no-basic # without the basic launcher's 400-job run (75 s)

For 400 and 5,000 jobs of one analytic grid (llama2-7b, seq x batch; five formulas and the time
model per job):

1. batched: `sweep.py -m ... hydra/launcher=batched`, a subprocess (start-up, composition,
   estimates, parts, collection and the summary): wall time and peak RSS.
2. basic: the same with `hydra/launcher=basic` (two full compositions per job: the sweeper's check,
   then the launch). Run at 400 jobs; at 5,000 extrapolated from it (5,000 x its time per job).
3. compose-only floor: Hydra's compose API on the same configurations in one process, nothing
   else (no estimates, no files). Run at 400; at 5,000 extrapolated the same way.
4. vectorized evaluator: `Columns.from_specs` of the jobs' specs and every formula and the time
   model on all of them at once (numpy; no rows, no files, no Hydra): what any sweep must compute.

Goals (issue 16): batched <= 0.3 x the compose-only floor at 400 jobs, 5,000 jobs under 30 s on
2 cores, peak RSS under 500 MiB. Then `collect` over 10,000 parts of 5 rows each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MIB = 2**20


def grid(jobs: int) -> list[str]:
    """seq x batch overrides of `jobs` jobs (20 batches)."""
    seqs = jobs // 20
    step = 128 if seqs <= 20 else 64
    return ["seq=" + ",".join(str(step * i) for i in range(1, seqs + 1)), "batch=" + ",".join(map(str, range(1, 21)))]


def values(overrides: list[str]) -> list[list[str]]:
    """Every job's overrides, as the sweeper makes them."""
    (seq, seqs), (batch, batches) = (o.split("=", 1) for o in overrides)
    return [[f"{seq}={s}", f"{batch}={b}"] for s in seqs.split(",") for b in batches.split(",")]


def run_sweep(overrides: list[str], launcher: str, out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one `sweep.py -m` in a subprocess."""
    cmd = [sys.executable, str(ROOT / "sweep.py"), "-m", *overrides, f"hydra/launcher={launcher}",
           f"hydra.sweep.dir={out}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


def compose_floor(jobs: list[list[str]]) -> float:
    """Hydra's compose API on every job's overrides, in this process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from memsweep.presets import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        compose("config", overrides=jobs[0])  # warm (plugin scan, first load)
        t0 = time.perf_counter()
        for overrides in jobs:
            compose("config", overrides=overrides)
        elapsed = time.perf_counter() - t0
    GlobalHydra.instance().clear()
    return elapsed


def vectorized(jobs: list[list[str]]) -> float:
    """Columns of every job and every formula and the time model on them at once."""
    import numpy as np

    from memsweep.columns import Columns
    from memsweep.formulas import FORMULAS
    from memsweep.formulas.timing import Speeds, TimeConstants, step_time
    from memsweep.presets import job_spec

    specs = [job_spec(**{k: int(v) for k, v in (o.split("=") for o in overrides)}) for overrides in jobs]
    t0 = time.perf_counter()
    cols = Columns.from_specs(specs)
    with np.errstate(all="ignore"):
        for formula in FORMULAS.values():
            formula(cols).total
        step_time(cols, Speeds.of([s.hardware for s in specs], [s.dtype for s in specs]), TimeConstants())
    return time.perf_counter() - t0


def bench_sweeps(tmp: Path, basic: bool) -> None:
    per_job: dict[str, float] = {}
    rows = []
    for n in (400, 5000):
        overrides = grid(n)
        jobs = values(overrides)
        assert len(jobs) == n
        wall, rss = run_sweep(overrides, "batched", tmp / f"batched-{n}")
        if n == 400:
            per_job["basic"] = run_sweep(overrides, "basic", tmp / "basic-400")[0] / n if basic else float("nan")
            per_job["floor"] = compose_floor(jobs) / n
        t_vec = vectorized(jobs)
        basic_s, floor_s = per_job["basic"] * n, per_job["floor"] * n
        rows.append((n, wall, rss, basic_s, floor_s, t_vec))
        note = "" if n == 400 else " (extrapolated: 5,000 x the per-job time at 400)"
        print(f"{n:>5,} jobs: batched {wall:6.2f} s ({1e3 * wall / n:6.2f} ms/job, peak RSS {rss:4.0f} MiB)   "
              f"basic {basic_s:7.1f} s ({1e3 * basic_s / n:6.1f} ms/job)   compose-only floor {floor_s:6.1f} s "
              f"({1e3 * floor_s / n:5.1f} ms/job){note}   vectorized evaluator {t_vec:6.3f} s "
              f"({1e3 * t_vec / n:6.3f} ms/job)", flush=True)
    for n, wall, rss, basic_s, floor_s, t_vec in rows:
        print(f"{n:>5,} jobs: batched / compose-only floor {wall / floor_s:.3f} (goal <= 0.3)   "
              f"basic / batched {basic_s / wall:5.1f}x   batched / vectorized evaluator {wall / t_vec:5.0f}x   "
              f"peak RSS {rss:.0f} MiB (goal < 500)" + ("   (goal: under 30 s)" if n == 5000 else ""))


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-basic", action="store_true", help="skip the basic launcher's 400-job run")
    ap.add_argument("--no-collect", action="store_true", help="skip the collect benchmark")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bench_sweeps(tmp, basic=not args.no_basic)
        if not args.no_collect:
            bench_collect(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
