"""Planner throughput: configurations per second, the vectorized grid against one job at a time.

    python scripts/bench_plan.py                 # 1,000,000-row grid, 300 sampled per-job calls
    python scripts/bench_plan.py --rows 200000 --sample 100

The grid is every case (5 models x {train bf16 mixed, train fp32, lora bf16 mixed, inference
bf16, inference int8}) x seq x batch, with as many seqs and batches as make `--rows`. The
vectorized path expands it from 25 base rows with numpy index arrays (memsweep.plan.Grid),
evaluates the formula in chunks and checks `total <= capacity` on every hardware. The per-job
path does the same for a random sample, one configuration at a time, as a sweep job does: a
validated JobSpec (`dataclasses.replace` of the case's spec) and `estimate_rows`; its time is
extrapolated to the whole grid. Both run in this one process, so the ratio compares like with
like. Goal: >= 1,000,000 configurations per second.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402

from memsweep.columns import Columns  # noqa: E402
from memsweep.estimate import estimate_rows  # noqa: E402
from memsweep.formulas import get_formula  # noqa: E402
from memsweep.plan import CHUNK_ROWS, Grid, PlanSpec, cross, make_plan, total_bytes  # noqa: E402
from memsweep.presets import job_spec  # noqa: E402

GOAL_PER_S = 1_000_000
MODELS = PlanSpec().models
CASES = (("train", "bf16", "mixed"), ("train", "fp32", "pure"), ("lora", "bf16", "mixed"),
         ("inference", "bf16", "pure"), ("inference", "int8", "pure"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="grid size (default 1,000,000)")
    ap.add_argument("--sample", type=int, default=300, help="configurations run one at a time")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of the vectorized path")
    ap.add_argument("--formula", default="detailed")
    args = ap.parse_args(argv)
    if args.rows < 1 or args.sample < 1 or args.repeats < 1:
        print("error: --rows, --sample and --repeats must be >= 1", file=sys.stderr)
        return 2

    spec = PlanSpec(formula=args.formula)
    formula = get_formula(args.formula, key="--formula")
    capacity = np.array([spec.capacity_bytes(h) for h in spec.hardware_specs()])
    jobs = [job_spec(m, wl=w, dtype=d, precision=p, seq=1, batch=1) for m in MODELS for w, d, p in CASES]
    side = math.ceil(math.sqrt(args.rows / len(jobs)))
    seqs = np.round(np.geomspace(128, 131072, side))
    batches = np.arange(1, side + 1, dtype=np.float64)
    n = len(jobs) * side * side
    print(f"grid: {n:,} configurations ({len(jobs)} cases x {side} seqs x {side} batches), "
          f"formula {formula.name}, fits checked on {len(capacity)} hardware")

    def vectorized() -> tuple[np.ndarray, np.ndarray]:
        base = Columns.from_specs(jobs)
        b, s, k = cross(len(jobs), side, side)
        grid = Grid(base, b, {"seq": seqs[s], "batch": batches[k]})
        total = total_bytes(formula, grid)
        return total, total[:, None] <= capacity

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        total, fits = vectorized()
        times.append(time.perf_counter() - t0)
    vec_s = statistics.median(times)
    vec_rate = n / vec_s
    print(f"vectorized (chunks of {CHUNK_ROWS:,} rows): {vec_s:.3f} s median of {args.repeats} "
          f"-> {vec_rate:,.0f} configurations/s ({int(fits.sum()):,} of {fits.size:,} "
          f"configuration x hardware pairs fit)")

    rng = np.random.default_rng(0)
    picks = rng.choice(n, size=min(args.sample, n), replace=False)
    b_all, s_all, k_all = (ix[picks] for ix in cross(len(jobs), side, side))
    t0 = time.perf_counter()
    one_by_one = []
    for b, s, k in zip(b_all, s_all, k_all):
        job = dataclasses.replace(jobs[b], seq=int(seqs[s]), batch=int(batches[k]))  # validates
        t = estimate_rows(job, [formula])[0]["total_bytes"]
        one_by_one.append(t)
        _ = [t <= c for c in capacity]
    job_s = time.perf_counter() - t0
    job_rate = len(picks) / job_s
    print(f"per job (JobSpec + estimate_rows, {len(picks)} sampled): {1e3 * job_s / len(picks):.2f} ms each "
          f"-> {job_rate:,.0f} configurations/s; {n:,} would take {n / job_rate / 60:.1f} min")
    print(f"ratio: vectorized / per job = {vec_rate / job_rate:,.0f}x")
    diff = np.abs(np.asarray(one_by_one, dtype=np.float64) - total[picks]).max()
    print(f"agreement: max |vectorized - per job| = {diff:.0f} bytes over {len(picks)} samples "
          "(estimate_rows rounds each term to whole bytes)")

    t0 = time.perf_counter()
    plan = make_plan(PlanSpec(formula=args.formula))
    print(f"default plan (make_plan, no files): {plan.table.height} rows in {time.perf_counter() - t0:.2f} s")
    met = vec_rate >= GOAL_PER_S
    print(f"goal >= {GOAL_PER_S:,} configurations/s: {'met' if met else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
