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
from memsweep.plan.cases import RECOMPUTE_COST
from memsweep.plan.render import fmt_int, layout_parts
from memsweep.plan.spec import PLAN_KEYS, PlanSpec, plan_spec_from_dict, sequence_parallel_applies
from memsweep.units import GIB

# ask's keys: the singular names a user types, onto the plan's (list) keys
SINGULAR = {"model": "models", "hardware": "hardware", "workload": "workloads", "seq": "seqs",
            "precision": "precisions", "batch": "gpus_batch"}
PASSED = ("optimizer", "recompute", "offload", "attention", "loss_chunks", "kv_dtype", "mixed_policy", "kernels",
          "formula", "margin", "reserved_mib", "max_batch", "rope_scaling", "global_batch", "min_saving",
          "tokens", "objective", "max_gpus", "time", "sequence_parallel")
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
    from memsweep.plan.cases import _technique_keys
    from memsweep.presets import job_spec, workload_spec
    from memsweep.specs import Parallel

    dtype, mode = parse_precision(spec.precisions[0])
    v = Variant(row["recompute"], row["offload"])
    training = workload_spec(spec.workloads[0]).training
    extra = ({**_technique_keys(spec, True), "offload": v.offload_spec(),
              "grad_accum": int(row["grad_accum"])} if training else {"kv_dtype": spec.kv_dtype})
    try:
        job = job_spec(spec.models[0], wl=spec.workloads[0], optimizer=spec.optimizer, hardware=spec.hardware[0],
                       parallel=Parallel("ask", tp=row["tp"], pp=row["pp"], dp=row["dp"], zero=row["zero"], ep=row["ep"],
                                         sequence_parallel=bool(sequence_parallel_applies(spec, training, row["tp"], row["seq"]))),
                       seq=row["seq"], batch=1, dtype=dtype, precision=mode, recompute=v.recompute,
                       attention=spec.attention, **extra)
    except ConfigError:
        return int(row["batch"])
    from memsweep.formulas import get_formula

    grid = Grid(Columns.from_specs([job]), np.zeros(1, dtype=np.int64))
    best = largest_fitting(get_formula(spec.formula), grid, "batch", np.array([spec.max_batch]),
                           np.array([float(row["capacity_bytes"])]))
    return int(best[0])


def _how(row: Mapping[str, Any], spec: PlanSpec | None = None) -> str:
    """'4 GPUs (tp2 pp2), recompute=full'; 'tp2 sp' where the plan's sequence parallel applies."""
    from memsweep.presets import workload_spec

    parts = layout_parts(row)
    training = workload_spec(row["workload"]).training
    if spec is not None and parts and sequence_parallel_applies(spec, training, row["tp"], row["seq"]):
        parts[0] = parts[0].replace(f"tp{row['tp']}", f"tp{row['tp']} sp", 1)
    gpus = f"{row['gpus']} GPU{'s' if row['gpus'] > 1 else ''}" + (f" ({', '.join(parts)})" if parts else "")
    if not training:  # a forward pass has nothing to recompute
        return gpus
    return f"{gpus}, recompute={row['recompute']}" + (f", offload={row['offload']}" if row["offload"] != "none" else "")


JOB_KEYS = {"dtype": "precision", "precision": "precision", "loss.chunks": "loss_chunks",
            "parallel.tp": "layouts.tp", "parallel.pp": "layouts.pp", "parallel.ep": "layouts.ep"}
"""A JobSpec's key for what ask's user typed under another name."""


def validate(spec: PlanSpec) -> None:
    """What would make the plan's row `invalid`, as a one-line ConfigError naming the key typed: a
    combination the JobSpec refuses (int8 training), a seq beyond the model's context (the plan's
    `cases.context_limit`), layouts none of which divide the model."""
    from memsweep.columns import Columns
    from memsweep.plan.cases import cases, context_limit

    case = cases(spec)[0]
    if case.job is None:
        e = case.error
        assert e is not None
        key = JOB_KEYS.get(e.key, e.key)
        raise ConfigError(key, spec.precisions[0] if key == "precision" else e.value, e.allowed)
    job, seq = case.job, spec.seqs[0]
    m = job.model
    limit = int(context_limit(Columns.from_specs([job]), spec)[0])
    if seq > limit:
        scaled = spec.rope_scaling if spec.rope_scaling and m.position != "learned" else None
        context = (f"rope_scaling={scaled:g} x " if scaled else "") + f"max_positions={m.max_positions:,}"
        less = f" less workload.gen_tokens={job.gen_tokens}" if job.gen_tokens else ""
        more = ("learned positions do not stretch" if m.position == "learned"
                else "a larger rope_scaling stretches it" if scaled else "rope_scaling=F stretches it F-fold")
        raise ConfigError("seq", seq, f"1 to {limit:,} for {m.name} · {spec.workloads[0]}: {context}{less} "
                                      f"({more})")
    lay = spec.layouts
    if not any(m.heads % t == 0 and m.kv_heads % t == 0 for t in lay.tp):
        raise ConfigError("layouts.tp", list(lay.tp),
                          f"a list with a divisor of heads={m.heads} and kv_heads={m.kv_heads}")
    if not any(p <= m.layers for p in lay.pp):
        raise ConfigError("layouts.pp", list(lay.pp), f"a list with a stage count up to layers={m.layers}")
    if m.experts and not any(m.experts % e == 0 for e in lay.ep):
        raise ConfigError("layouts.ep", list(lay.ep), f"a list with a divisor of experts={m.experts}")


LIGHTER = {"train": (("workload", "lora"), ("workload", "qlora")), "lora": (("workload", "qlora"),),
           "inference": (("precision", "int8"), ("precision", "int4"))}
"""What a none_fits answer suggests, by workload kind: the lighter ways to the same model, tried
in order; the first that fits (on the same GPU budget) is named."""


def _rank1(spec: PlanSpec) -> tuple[pl.DataFrame, dict[str, Any]]:
    from memsweep.plan import make_plan

    t = make_plan(spec, questions=("min_gpus",), with_curves=False).table
    return t, t.filter(pl.col("rank") == 1).row(0, named=True)


def lighter(spec: PlanSpec) -> str:
    """'; with workload=qlora it fits on 1 GPU, recompute=full' or ''."""
    from dataclasses import replace

    from memsweep.plan.spec import parse_precision
    from memsweep.presets import workload_spec

    kind = workload_spec(spec.workloads[0]).kind
    dtype = parse_precision(spec.precisions[0])[0]
    for key, value in LIGHTER.get(kind, ()):
        if key == "precision" and dtype in ("int8", "int4"):
            continue
        try:
            alt = replace(spec, **({"workloads": (value,)} if key == "workload" else {"precisions": (value,)}))
            validate(alt)
            r = _rank1(alt)[1]
        except ConfigError:
            continue
        if r["status"] == "ok":
            return f"; with {key}={value} it fits on {_how(r, alt)}"
    return ""


def _budget(spec: PlanSpec, r: Mapping[str, Any]) -> str:
    """objective=fastest's GPU budget in words (search.py's rule)."""
    if spec.max_gpus:
        return f"within max_gpus={spec.max_gpus}"
    node = spec.hardware_specs()[0].gpus_per_node
    n = int(r["limit"])
    return (f"within {n:,} GPU{'s' if n > 1 else ''} (the fewest whole nodes it fits on: {n // node} × {node}; "
            "max_gpus=N allows more)")


def answer(spec: PlanSpec) -> str:
    """The one sentence; a ConfigError naming the key when the question is not a valid configuration."""
    from memsweep.plan.cases import precision_label
    from memsweep.presets import workload_spec

    validate(spec)
    t, r = _rank1(spec)
    label = precision_label(r["workload"], r["dtype"], r["precision"])
    what = (f"{r['model']} · {r['workload']} · {label} at seq {fmt_int(r['seq'])} on {r['hardware']} "
            f"(capacity {r['capacity_bytes'] / GIB:.1f} GiB)")
    if r["status"] == "invalid":  # a guard: validate() names the key of every reason the plan has
        raise ConfigError("model", spec.models[0], f"a valid configuration ({r['reason']})")
    if r["status"] == "none_fits":
        return f"{what}: nothing fits {r['reason']}{lighter(spec)}."
    per = (f"a global batch of {spec.global_batch} as micro-batch {r['batch']} × {r['grad_accum']} accumulation"
           if spec.global_batch else f"batch {r['batch']} per GPU")
    goal = f"fastest {_budget(spec, r)}: " if spec.objective == "fastest" else "fits on "
    out = (f"{what}: {goal}{_how(r, spec)}; {per} takes {r['total_gib']:.1f} GiB per GPU, "
           f"+{r['headroom_gib']:.1f} GiB headroom")
    if not spec.global_batch:
        serve = workload_spec(r["workload"]).kind == "serve"  # its batch: the engine's concurrent sequences
        what_batch = "concurrent sequences of that length" if serve else "largest batch on that layout"
        out += f" ({what_batch}: {fmt_int(largest_batch(spec, r))}"
        most = max(spec.recompute, key=RECOMPUTE_COST.index)  # the plan's most memory-saving recompute
        if workload_spec(r["workload"]).training and most != r["recompute"]:
            out += f"; with recompute={most}: {fmt_int(largest_batch(spec, {**r, 'recompute': most}))}"
        out += ")"
    out += _speed(spec, r)
    alt = t.filter(pl.col("rank") == 2)
    if alt.height:
        a = alt.row(0, named=True)
        label = "Fewest GPUs" if spec.objective == "fastest" else "Runner-up"
        out += f". {label}: {_how(a, spec)}, +{a['headroom_gib']:.1f} GiB"
        if spec.objective == "fastest" and _known(a["est_tokens_per_s"]):
            out += f", about {a['est_tokens_per_s'] * a['gpus']:,.0f} tokens/s in all"
    return out + "."


def _known(v: float | None) -> bool:
    return v is not None and v == v


def _speed(spec: PlanSpec, r: Mapping[str, Any]) -> str:
    """'; about 9,642 tokens/s per GPU (MFU 45%, 1,234 GPU-hours for 1e+12 tokens)' ('' without speeds)."""
    if not _known(r["est_tokens_per_s"]):
        return ""
    out = f"; about {r['est_tokens_per_s']:,.0f} tokens/s per GPU"
    if spec.objective == "fastest":
        out += f", {r['est_tokens_per_s'] * r['gpus']:,.0f} in all"
    out += f" (MFU {r['est_mfu']:.0%}"
    return out + (f", {r['gpu_hours']:,.0f} GPU-hours for {spec.tokens:.3g} tokens)" if spec.tokens else ")")


def usage(prog: str) -> str:
    return (f"usage: {prog} model=NAME hardware=NAME [workload=train] [seq=2048] [batch=1] [KEY=VALUE ...]\n\n"
            "One sentence: the fewest GPUs and the cheapest way to fit (fewest GPUs, then no offload, then least\n"
            "recompute, then the largest micro-batch), the memory and headroom per GPU, the largest batch on that\n"
            "layout, and the runner-up. objective=fastest: the most tokens/s over all GPUs within max_gpus, or\n"
            "without it within the fewest whole nodes that fit (the hardware's gpus_per_node). When nothing fits:\n"
            "the closest layout's shortfall, and what would fit (without max_gpus; lora / qlora; int8 / int4).\n"
            "A question that is not a valid configuration (a seq beyond the model's context, int8 training) is\n"
            f"one error line naming the key, exit status 2.\n\nkeys: {', '.join(ASK_KEYS)}")


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
