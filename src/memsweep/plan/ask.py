"""One question, one sentence:

    python scripts/plan.py ask model=llama3-8b hardware=a100-40g workload=lora seq=4096

answers with the fewest GPUs and the cheapest way to fit (the plan's order), the memory and
headroom per GPU, the largest micro-batch on that layout, and the runner-up. No Hydra: key=value
arguments straight onto a PlanSpec, so it answers in well under a second.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from memsweep.columns import Columns
from memsweep.errors import ConfigError
from memsweep.plan.render import fmt_int, layout_parts
from memsweep.plan.spec import PLAN_KEYS, PlanSpec, plan_spec_from_dict
from memsweep.units import GIB

# ask's keys: the singular names a user types, onto the plan's (list) keys
SINGULAR = {"model": "models", "hardware": "hardware", "workload": "workloads", "seq": "seqs",
            "precision": "precisions", "batch": "gpus_batch"}
PASSED = ("optimizer", "recompute", "offload", "attention", "loss_chunks", "kv_dtype", "mixed_policy",
          "formula", "margin", "reserved_mib", "max_batch", "rope_scaling", "global_batch", "min_saving",
          "tokens", "objective", "max_gpus", "time")
LAYOUT = ("tp", "pp", "dp", "zero", "ep")
ASK_KEYS = (*SINGULAR, *PASSED, *(f"layouts.{k}" for k in LAYOUT))
REQUIRED = ("model", "hardware")


def parse_args(argv: Sequence[str]) -> PlanSpec:
    """key=value arguments (a value may be a list: recompute=[none,full]) -> PlanSpec."""
    import yaml

    given: dict[str, Any] = {}
    for arg in argv:
        key, eq, text = arg.partition("=")
        if not eq or key not in ASK_KEYS:
            raise ConfigError(key or arg, text if eq else None, f"ask keys: {', '.join(ASK_KEYS)}")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        given[key] = value
    for key in REQUIRED:
        if key not in given:
            raise ConfigError(key, None, f"a preset name (ask needs {' and '.join(f'{k}=...' for k in REQUIRED)})")
    values: dict[str, Any] = {"batches": [1]}
    for key, value in given.items():
        if key in SINGULAR:
            if isinstance(value, list):
                raise ConfigError(key, value, "one value (ask answers one question; plan.py compares many)")
            values[SINGULAR[key]] = value if key == "batch" else [value]
        elif key.startswith("layouts."):
            values.setdefault("layouts", {})[key.split(".", 1)[1]] = value
        else:
            values[key] = value
    values.setdefault("workloads", ["train"])
    values.setdefault("seqs", [2048])
    assert set(values) <= set(PLAN_KEYS)
    try:
        return plan_spec_from_dict(values)
    except ConfigError as exc:  # the plan's name of a key (models) back to the one typed (model)
        typed = {v: k for k, v in SINGULAR.items()}.get(exc.key)
        if typed is None:
            raise
        raise ConfigError(typed, exc.value, exc.allowed) from None


def largest_batch(spec: PlanSpec, row: Mapping[str, Any]) -> int:
    """The largest micro-batch on the answer's layout and variant (same search as the plan's)."""
    from memsweep.plan.cases import Variant
    from memsweep.plan.grid import Grid, largest_fitting
    from memsweep.plan.spec import parse_precision
    from memsweep.presets import job_spec, workload_spec
    from memsweep.specs import LossSpec, Parallel

    dtype, mode = parse_precision(spec.precisions[0])
    v = Variant(row["recompute"], row["offload"])
    training = workload_spec(spec.workloads[0]).training
    extra = ({"loss": LossSpec(chunks=spec.loss_chunks), "mixed_policy": spec.mixed_policy, "offload": v.offload_spec(),
              "grad_accum": int(row["grad_accum"])} if training else {"kv_dtype": spec.kv_dtype})
    try:
        job = job_spec(spec.models[0], wl=spec.workloads[0], optimizer=spec.optimizer, hardware=spec.hardware[0],
                       parallel=Parallel("ask", tp=row["tp"], pp=row["pp"], dp=row["dp"], zero=row["zero"], ep=row["ep"]),
                       seq=row["seq"], batch=1, dtype=dtype, precision=mode, recompute=v.recompute,
                       attention=spec.attention, **extra)
    except ConfigError:
        return int(row["batch"])
    from memsweep.formulas import get_formula

    grid = Grid(Columns.from_specs([job]), np.zeros(1, dtype=np.int64))
    best = largest_fitting(get_formula(spec.formula), grid, "batch", np.array([spec.max_batch]),
                           np.array([float(row["capacity_bytes"])]))
    return int(best[0])


def _how(row: Mapping[str, Any]) -> str:
    """'4 GPUs (tp2 pp2), recompute=full'."""
    parts = layout_parts(row)
    gpus = f"{row['gpus']} GPU{'s' if row['gpus'] > 1 else ''}" + (f" ({', '.join(parts)})" if parts else "")
    from memsweep.presets import workload_spec

    if not workload_spec(row["workload"]).training:  # a forward pass has nothing to recompute
        return gpus
    return f"{gpus}, recompute={row['recompute']}" + (f", offload={row['offload']}" if row["offload"] != "none" else "")


def answer(spec: PlanSpec) -> str:
    """The one sentence."""
    from memsweep.plan import make_plan
    from memsweep.plan.cases import precision_label
    from memsweep.presets import workload_spec

    plan = make_plan(spec, questions=("min_gpus",), with_curves=False)
    t = plan.table
    r = t.filter(pl.col("rank") == 1).row(0, named=True)
    label = precision_label(r["workload"], r["dtype"], r["precision"])
    what = (f"{r['model']} · {r['workload']} · {label} at seq {fmt_int(r['seq'])} on {r['hardware']} "
            f"(capacity {r['capacity_bytes'] / GIB:.1f} GiB)")
    if r["status"] == "invalid":
        return f"{what}: not a valid configuration: {r['reason']}."
    if r["status"] == "none_fits":
        return f"{what}: nothing searched fits: {r['reason']}."
    per = (f"a global batch of {spec.global_batch} as micro-batch {r['batch']} × {r['grad_accum']} accumulation"
           if spec.global_batch else f"batch {r['batch']} per GPU")
    goal = (f"fastest within {spec.max_gpus or 'any number of'} GPUs on" if spec.objective == "fastest"
            else "fits on")
    out = (f"{what}: {goal} {_how(r)}; {per} takes {r['total_gib']:.1f} GiB per GPU, "
           f"+{r['headroom_gib']:.1f} GiB headroom")
    if not spec.global_batch:
        serve = workload_spec(r["workload"]).kind == "serve"  # its batch: the engine's concurrent sequences
        what_batch = "concurrent sequences of that length" if serve else "largest batch on that layout"
        out += f" ({what_batch}: {fmt_int(largest_batch(spec, r))}"
        most = spec.recompute[-1]  # the plan's most memory-saving recompute
        if workload_spec(r["workload"]).training and most != r["recompute"]:
            out += f"; with recompute={most}: {fmt_int(largest_batch(spec, {**r, 'recompute': most}))}"
        out += ")"
    if r["est_tokens_per_s"] is not None and r["est_tokens_per_s"] == r["est_tokens_per_s"]:
        out += f"; about {r['est_tokens_per_s']:,.0f} tokens/s per GPU (MFU {r['est_mfu']:.0%}"
        out += f", {r['gpu_hours']:,.0f} GPU-hours for {spec.tokens:.3g} tokens)" if spec.tokens else ")"
    alt = t.filter(pl.col("rank") == 2)
    if alt.height:
        a = alt.row(0, named=True)
        label = "Fewest GPUs" if spec.objective == "fastest" else "Runner-up"
        out += f". {label}: {_how(a)}, +{a['headroom_gib']:.1f} GiB"
    return out + "."


def usage(prog: str) -> str:
    return (f"usage: {prog} model=NAME hardware=NAME [workload=train] [seq=2048] [batch=1] [KEY=VALUE ...]\n\n"
            "One sentence: the fewest GPUs and the cheapest way to fit (fewest GPUs, then no offload, then least\n"
            "recompute, then the largest micro-batch), the memory and headroom per GPU, the largest batch on that\n"
            f"layout, and the runner-up.\n\nkeys: {', '.join(ASK_KEYS)}")


def main(argv: Sequence[str], prog: str = "memsweep plan ask") -> int:
    if "--help" in argv or "-h" in argv:
        print(usage(prog))
        return 0
    try:
        print(answer(parse_args(argv)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
