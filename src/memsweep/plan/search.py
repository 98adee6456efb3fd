"""The three questions, searched over the knobs people turn.

For every case (model x workload x precision) and hardware:

- `max_batch`: the largest micro-batch per GPU at each seq, on the plan's layout (`parallel`);
- `max_seq`:   the longest sequence at each of `batches`, on the same layout;
- `min_gpus`:  the fewest GPUs, over tensor x pipeline x data parallel layouts with every ZeRO
  stage (and expert parallelism for MoE models), at `gpus_batch` per GPU or splitting
  `global_batch` into micro-batch x gradient accumulation.

Each question is searched over the case's variants (recompute x offload, `cases.Variant`). The
answer is the cheapest that fits, by a stated order:

- min_gpus: fewest GPUs, then the cheapest variant (no offload before offload, then none <
  selective < full recompute), then the largest micro-batch, then the fewest pipeline stages (a
  pipeline idles in its bubble), then the most headroom;
- min_gpus with `objective=fastest`: the most tokens/s over all the layout's GPUs, within a GPU
  budget: `max_gpus` when given, else the fewest whole nodes that fit (the fewest-GPUs answer
  rounded up to the hardware's `gpus_per_node`). Unbounded, "fastest" is the largest layout
  searched (4,096 GPUs at a few % MFU for batch 1 per GPU); GPUs beyond the nodes a job needs are
  a cost decision the user states with `max_gpus`;
- max_batch / max_seq: the largest answer (that is the question), then the cheapest variant.

The runner-up (`rank` 2) is the cheapest alternative: for min_gpus the best layout with a cheaper
variant (what more GPUs buy), else the best other layout with no costlier variant; for max_batch / max_seq the cheapest
variant that fits at all, when the answer needed a costlier one. A data-parallel layout must earn
its GPUs: doubling dp has to save `min_saving` of the capacity per GPU.

"Fits" is memsweep.capacity's definition, the sweep's `fits` too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from memsweep.capacity import capacity_bytes
from memsweep.columns import Array, Columns
from memsweep.formulas import TERMS, Breakdown, Formula, get_formula
from memsweep.formulas.timing import Speeds, TimeConstants, production_work, step_time
from memsweep.plan.cases import Case, Variant, cases, context_limit, model_params
from memsweep.plan.grid import Grid, cross, evaluate, first_per_group, largest_fitting, total_bytes
from memsweep.plan.render import layout_parts
from memsweep.plan.spec import PlanSpec, sequence_parallel_applies
from memsweep.presets import model_spec
from memsweep.specs import Hardware
from memsweep.units import GIB, MIB

QUESTIONS = ("max_batch", "max_seq", "min_gpus")
STATUSES = ("ok", "none_fits", "invalid")

# One row per question x case x hardware x (seq or batch) x rank. Declared once, like results.SCHEMA.
PLAN_SCHEMA: dict[str, pl.DataType] = {
    "question": pl.String(),        # max_batch | max_seq | min_gpus
    "rank": pl.Int64(),             # 1: the answer; 2: the runner-up (the cheapest alternative)
    "model": pl.String(),
    "family": pl.String(),
    "params": pl.Int64(),
    "workload": pl.String(),
    "dtype": pl.String(),
    "precision": pl.String(),       # effective: mixed | pure (as in results.parquet)
    "optimizer": pl.String(),
    "recompute": pl.String(),       # the variant the answer uses
    "offload": pl.String(),         # none | activations | optimizer | params
    "attention": pl.String(),
    "hardware": pl.String(),
    "hardware_bytes": pl.Int64(),   # usable: (memory_mib - reserved_mib) MiB
    "margin": pl.Float64(),
    "capacity_bytes": pl.Int64(),   # memsweep.capacity: what a plan may fill
    "formula": pl.String(),
    "seq": pl.Int64(),              # given (max_batch, min_gpus) or the answer (max_seq)
    "context": pl.Int64(),          # the longest valid seq (max_positions, x rope_scaling)
    "batch": pl.Int64(),            # micro-batch per GPU: the answer (max_batch) or given
    "grad_accum": pl.Int64(),       # micro-batches per step (min_gpus with global_batch)
    "tp": pl.Int64(),
    "pp": pl.Int64(),
    "dp": pl.Int64(),
    "zero": pl.Int64(),
    "ep": pl.Int64(),
    "gpus": pl.Int64(),             # tp * pp * dp; the answer of min_gpus
    "limit": pl.Int64(),            # the search's upper bound (max_batch, seq limit, the GPU budget)
    "capped": pl.Boolean(),         # the answer is the upper bound: the true one may be larger
    "status": pl.String(),          # ok | none_fits | invalid
    "reason": pl.String(),
    **{f"{t}_bytes": pl.Int64() for t in TERMS},
    "total_bytes": pl.Int64(),
    "total_gib": pl.Float64(),
    "headroom_gib": pl.Float64(),   # (capacity - total) / 2^30; negative: the shortfall
    "est_step_time_s": pl.Float64(),  # formulas.timing: one optimizer step (inference: one request)
    "est_tokens_per_s": pl.Float64(),  # per GPU (training tokens; inference: generated tokens)
    "est_mfu": pl.Float64(),
    "gpu_hours": pl.Float64(),      # the plan's `tokens` budget at est_tokens_per_s per GPU
}


# --- the context: base rows, one per case x variant -------------------------------------------

@dataclass(frozen=True)
class Context:
    spec: PlanSpec
    formula: Formula
    cases: list[Case]            # all, in config order
    row_case: Array              # base row -> index into cases
    row_variant: list[Variant]   # base row -> its variant
    base: Columns | None         # one row per valid case x variant; None when there is none
    hardware: list[Hardware]
    time: TimeConstants = TimeConstants()  # the time model's constants (the plan's `time` key)

    @property
    def rows(self) -> int:
        return len(self.row_variant)

    @property
    def cost(self) -> Array:
        return np.array([v.cost for v in self.row_variant], dtype=np.float64)

    @property
    def invalid(self) -> list[Case]:
        return [c for c in self.cases if not c.jobs]

    def capacity(self, b: Array, h: Array) -> Array:
        """Per (base row, hardware) pair: memsweep.capacity's capacity (a serve engine's budget)."""
        mem = np.array([x.memory_bytes for x in self.hardware], dtype=np.float64)[h]
        res = np.array([x.reserved_mib * MIB for x in self.hardware], dtype=np.float64)[h]
        base = self.base
        if base is None:
            return capacity_bytes(mem, res, self.spec.margin)
        return capacity_bytes(mem, res, self.spec.margin, gpu_util=base.gpu_util[b], serve=base.serve[b] == 1)


def context(spec: PlanSpec) -> Context:
    all_cases = cases(spec)
    row_case, row_variant, jobs = [], [], []
    for i, c in enumerate(all_cases):
        for v, j in c.jobs:
            row_case.append(i)
            row_variant.append(v)
            jobs.append(j)
    base = Columns.from_specs(jobs) if jobs else None
    return Context(spec, get_formula(spec.formula, key="formula"), all_cases, np.asarray(row_case, dtype=np.int64),
                   row_variant, base, spec.hardware_specs(), spec.time_constants())


# --- rows of the plan table ----------------------------------------------------------------------

def frame(ctx: Context, question: str, b: Array, h: Array, status: Array, numbers: Mapping[str, Array],
          breakdown: Breakdown | None, reason: Array | None = None, rank: Array | None = None) -> pl.DataFrame:
    """Plan rows from per-row arrays over base rows `b` (NaN = null); terms null where invalid."""
    n = len(b)
    cs = [ctx.cases[i] for i in ctx.row_case[b]]
    vs = [ctx.row_variant[i] for i in b]
    hw = ctx.hardware
    capacity = ctx.capacity(b, h) if ctx.base is not None else np.full(n, np.nan)
    data: dict[str, Any] = {
        "question": [question] * n,
        "rank": np.ones(n) if rank is None else rank,
        "model": [c.model for c in cs],
        "family": [model_spec(c.model).family for c in cs],
        "params": np.array([model_params(c.model) for c in cs], dtype=np.float64),
        "workload": [c.workload for c in cs], "dtype": [c.dtype for c in cs],
        "precision": [c.precision for c in cs],
        "optimizer": [ctx.spec.optimizer] * n,
        "recompute": [v.recompute for v in vs], "offload": [v.offload for v in vs],
        "attention": [ctx.spec.attention] * n,
        "hardware": [hw[i].name for i in h],
        "hardware_bytes": np.array([x.usable_bytes for x in hw], dtype=np.float64)[h],
        "margin": np.full(n, float(ctx.spec.margin)),
        "capacity_bytes": np.floor(capacity),
        "formula": [ctx.formula.name] * n,
        "context": context_limit(ctx.base, ctx.spec)[b] if n else np.zeros(0),
        "status": list(status),
        "reason": list(reason) if reason is not None else [None] * n,
    }
    for name in ("seq", "batch", "grad_accum", "tp", "pp", "dp", "zero", "ep", "gpus", "limit"):
        data[name] = np.asarray(numbers.get(name, np.full(n, np.nan)), dtype=np.float64)
    data["capped"] = np.asarray(numbers.get("capped", np.zeros(n, dtype=bool)), dtype=bool)
    evaluated = np.asarray(status) != "invalid"  # invalid rows are listed, never evaluated
    for t in TERMS:
        term = np.round(getattr(breakdown, t)) if breakdown is not None else np.nan
        data[f"{t}_bytes"] = np.where(evaluated, term, np.nan)
    total = sum(data[f"{t}_bytes"] for t in TERMS)
    data["total_bytes"] = total
    data["total_gib"] = total / GIB
    data["headroom_gib"] = (capacity - total) / GIB
    data.update(time_columns(ctx, b, h, numbers, np.asarray(status) == "ok"))
    return to_frame(data)


def _answer_grid(ctx: Context, b: Array, numbers: Mapping[str, Array]) -> Grid:
    """The rows' own configurations: the base rows with each answer's numbers (NaN: the base's)."""
    values = {}
    for key in ("seq", "batch", "grad_accum", "tp", "pp", "dp", "zero", "ep"):
        if key in numbers:
            x = np.asarray(numbers[key], dtype=np.float64)
            values[key] = np.where(np.isfinite(x), x, getattr(ctx.base, key)[b])
    return Grid(ctx.base, b, values)


def speeds(ctx: Context, b: Array, h: Array) -> Speeds:
    dtypes = [ctx.cases[i].dtype for i in ctx.row_case[b]]
    return Speeds.of([ctx.hardware[i] for i in h], dtypes)


def time_columns(ctx: Context, b: Array, h: Array, numbers: Mapping[str, Array], ok: Array) -> dict[str, Array]:
    """Estimated step time, tokens/s per GPU, MFU and GPU-hours for the plan's `tokens` at each
    answer (formulas.timing; null where nothing fits or a hardware preset has no speeds)."""
    n = len(b)
    if not n or ctx.base is None or not ok.any():
        return {k: np.full(n, np.nan) for k in ("est_step_time_s", "est_tokens_per_s", "est_mfu", "gpu_hours")}
    rows = np.flatnonzero(ok)
    t = step_time(_answer_grid(ctx, b[rows], {k: np.asarray(v)[rows] for k, v in numbers.items()
                                              if np.ndim(v)}).columns(), speeds(ctx, b[rows], h[rows]), ctx.time)
    out = {k: np.full(n, np.nan) for k in ("est_step_time_s", "est_tokens_per_s", "est_mfu", "gpu_hours")}
    out["est_step_time_s"][rows] = t.step_s
    out["est_tokens_per_s"][rows] = t.tokens_per_s
    out["est_mfu"][rows] = t.mfu
    if ctx.spec.tokens is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            out["gpu_hours"][rows] = ctx.spec.tokens / t.tokens_per_s / 3600.0
    return out


def to_frame(data: Mapping[str, Any]) -> pl.DataFrame:
    cols = []
    for name, dtype in PLAN_SCHEMA.items():
        v = data[name]
        if isinstance(dtype, pl.String):
            cols.append(pl.Series(name, [None if x is None else str(x) for x in v], dtype=pl.String))
        elif isinstance(dtype, pl.Boolean):
            cols.append(pl.Series(name, np.asarray(v, dtype=bool)))
        else:
            s = pl.Series(name, np.asarray(v, dtype=np.float64)).fill_nan(None)
            cols.append(s.round().cast(pl.Int64) if isinstance(dtype, pl.Int64) else s)
    return pl.DataFrame(cols)


def invalid_rows(ctx: Context, question: str, axis_name: str, axis: Sequence[int]) -> pl.DataFrame:
    """Rows for the cases a JobSpec rejected: listed with the reason, nothing evaluated."""
    bad = ctx.invalid
    if not bad:
        return pl.DataFrame(schema=PLAN_SCHEMA)
    c_idx, a_idx, h_idx = cross(len(bad), len(axis), len(ctx.hardware))
    n = len(c_idx)
    hw = ctx.hardware
    data: dict[str, Any] = {name: [None] * n for name, t in PLAN_SCHEMA.items() if isinstance(t, pl.String)}
    data.update({name: np.full(n, np.nan) for name, t in PLAN_SCHEMA.items() if not isinstance(t, (pl.String, pl.Boolean))})
    data.update({
        "question": [question] * n, "rank": np.ones(n),
        "model": [bad[i].model for i in c_idx], "family": [model_spec(bad[i].model).family for i in c_idx],
        "params": np.array([model_params(bad[i].model) for i in c_idx], dtype=np.float64),
        "workload": [bad[i].workload for i in c_idx], "dtype": [bad[i].dtype for i in c_idx],
        "precision": [bad[i].precision for i in c_idx], "optimizer": [ctx.spec.optimizer] * n,
        "attention": [ctx.spec.attention] * n, "hardware": [hw[i].name for i in h_idx],
        "hardware_bytes": np.array([x.usable_bytes for x in hw], dtype=np.float64)[h_idx],
        "margin": np.full(n, float(ctx.spec.margin)),
        "capacity_bytes": np.floor([ctx.spec.capacity_bytes(hw[i]) for i in h_idx]),
        "formula": [ctx.formula.name] * n, axis_name: np.asarray(axis, dtype=np.float64)[a_idx],
        "capped": np.zeros(n, dtype=bool), "status": ["invalid"] * n,
        "reason": [bad[i].reason for i in c_idx],
    })
    return to_frame(data)


def _seq_reason(limit: Array, gen_tokens: Array, learned: Array) -> Array:
    """'seq > 8,064: the model's context (max_positions) less the 128 generated tokens (gen_tokens);
    rope_scaling stretches a RoPE model's' (cases.context_limit's rule, in words)."""
    out = []
    for x, g, pos in zip(limit, gen_tokens, learned):
        less = f" less the {int(g):,} generated tokens (gen_tokens)" if g > 0 else ""
        stretch = "learned positions do not stretch" if pos == 1 else "rope_scaling stretches a RoPE model's"
        out.append(f"seq > {int(x):,}: the model's context (max_positions){less}; {stretch}")
    return np.array(out, dtype=object)


def with_shortfall_reason(df: pl.DataFrame, what: str) -> pl.DataFrame:
    """none_fits rows say by how much, with the closest variant: '<what> needs X GiB > capacity
    Y GiB (recompute=full)'."""
    text = pl.format(f"{what} needs {{}} GiB > capacity {{}} GiB{{}}", pl.col("total_gib").round(2),
                     (pl.col("capacity_bytes") / GIB).round(2),
                     pl.when(pl.col("recompute") != "none")
                     .then(pl.format(" (recompute={})", pl.col("recompute"))).otherwise(pl.lit("")))
    return df.with_columns(
        reason=pl.when(pl.col("status") == "none_fits").then(text).otherwise(pl.col("reason")))


def _layout_numbers(base: Columns, b: Array) -> dict[str, Array]:
    tp, pp, dp = base.tp[b], base.pp[b], base.dp[b]
    return {"tp": tp, "pp": pp, "dp": dp, "zero": base.zero[b], "ep": base.ep[b], "gpus": tp * pp * dp,
            "grad_accum": base.grad_accum[b]}


# --- largest batch, longest sequence: the plan's layout, every variant --------------------------

def _largest(ctx: Context, question: str, key: str, axis_name: str, axis: Sequence[int]) -> pl.DataFrame:
    """max_batch (key batch, axis seq) or max_seq (key seq, axis batch): per case x axis value x
    hardware, the largest `key` over the case's variants (ties: the cheapest), and the runner-up,
    the cheapest variant that fits when the answer needed a costlier one."""
    spec, base = ctx.spec, ctx.base
    parts = [invalid_rows(ctx, question, axis_name, axis)]
    if base is None:
        return pl.concat(parts)
    values = np.asarray(axis, dtype=np.float64)
    nb, na, nh = ctx.rows, len(values), len(ctx.hardware)
    b, a, h = cross(nb, na, nh)
    ctx_limit = context_limit(base, spec)[b]
    if key == "batch":
        seq, hi = values[a], np.where(values[a] <= ctx_limit, spec.max_batch, 0)
        grid = Grid(base, b, {"seq": seq, "batch": np.ones(len(b))})
        valid = seq <= ctx_limit
    else:
        hi = np.maximum(ctx_limit, 0)
        grid = Grid(base, b, {"seq": np.ones(len(b)), "batch": values[a]})
        valid = hi >= 1
    best = largest_fitting(ctx.formula, grid, key, hi, ctx.capacity(b, h))
    group = (ctx.row_case[b] * na + a) * nh + h
    cost = ctx.cost[b]
    point = evaluate(ctx.formula, grid.replace(**{key: np.maximum(best, 1)}))
    _, answer = first_per_group(group, -best, cost, point.total)
    # where nothing fits, show the variant that comes closest (its shortfall is the reason)
    _, closest = first_per_group(group, point.total)
    answer = np.where(best[answer] > 0, answer, closest)
    _, cheapest = first_per_group(group, best <= 0, cost)
    alt = cheapest[(best[cheapest] > 0) & (cost[cheapest] < cost[answer])]
    rows = np.concatenate([answer, alt])
    rank = np.concatenate([np.ones(len(answer)), np.full(len(alt), 2.0)])
    r_best, r_valid = best[rows], valid[rows]
    status = np.where(~r_valid, "invalid", np.where(r_best == 0, "none_fits", "ok"))
    reason = np.where(r_valid, None, _seq_reason(ctx_limit[rows], base.gen_tokens[b[rows]],
                                                  base.learned_positions[b[rows]])).astype(object)
    limit = np.full(len(rows), float(spec.max_batch)) if key == "batch" else hi[rows]
    numbers = {**_layout_numbers(base, b[rows]), "limit": limit, "capped": (r_best == limit) & (r_best > 0),
               key: np.where(r_best > 0, r_best, np.nan),
               axis_name: values[a[rows]]}
    bd = Breakdown(**{t: getattr(point, t)[rows] for t in TERMS})
    parts.append(frame(ctx, question, b[rows], h[rows], status, numbers, bd, reason, rank))
    return with_shortfall_reason(pl.concat(parts), "batch 1" if key == "batch" else "seq 1")


def max_batch_rows(ctx: Context) -> pl.DataFrame:
    return _largest(ctx, "max_batch", "batch", "seq", ctx.spec.seqs)


def max_seq_rows(ctx: Context) -> pl.DataFrame:
    return _largest(ctx, "max_seq", "seq", "batch", ctx.spec.batches)


# --- fewest GPUs: every layout, every variant ----------------------------------------------------

@dataclass(frozen=True)
class LayoutSet:
    """The layouts one kind of case may use (training or not, MoE or dense), with, for each
    data-parallel layout, the index of the one with the next smaller dp (its `min_saving` check)."""

    tp: Array
    pp: Array
    dp: Array
    zero: Array
    ep: Array
    micro: Array
    accum: Array
    ref: Array  # index of the next-smaller-dp layout; -1 when dp is the smallest

    def __len__(self) -> int:
        return int(self.tp.size)


def layout_set(spec: PlanSpec, training: bool, moe: bool) -> LayoutSet:
    lay, g = spec.layouts, spec.global_batch
    dps = sorted(set(lay.dp) | {1}) if training else [1]  # replicas do not shrink a forward's memory
    rows: list[tuple[int, ...]] = []
    for tp in lay.tp:
        for pp in lay.pp:
            for dp in dps:
                for zero in (sorted(lay.zero) if dp > 1 else [0]):
                    for ep in (lay.ep if moe else (1,)):
                        if dp % ep:
                            continue
                        if g is None:
                            micros = [(spec.gpus_batch, 1)]
                        elif not training:
                            micros = [(g, 1)]
                        elif g % dp:
                            continue
                        else:
                            per_rank = g // dp
                            micros = [(m, per_rank // m) for m in range(1, per_rank + 1) if per_rank % m == 0]
                        rows += [(tp, pp, dp, zero, ep, m, k) for m, k in micros]
    index = {r: i for i, r in enumerate(rows)}
    ref = []
    for tp, pp, dp, zero, ep, m, k in rows:
        smaller = [d for d in dps if d < dp]
        if not smaller:
            ref.append(-1)
            continue
        d = smaller[-1]
        key = (tp, pp, d, zero if d > 1 else 0, math.gcd(ep, d), m, k * dp // d)
        ref.append(index.get(key, -1))
    arr = np.array(rows, dtype=np.float64).reshape(-1, 7)
    return LayoutSet(*(arr[:, i] for i in range(7)), ref=np.asarray(ref, dtype=np.int64))


def min_gpus_rows(ctx: Context) -> pl.DataFrame:
    """The fewest GPUs at each seq on each hardware: every layout x variant of a case is evaluated
    once, then compared with each hardware's capacity. A none_fits row reports the layout closest
    to fitting within the GPU cap (`max_gpus`), and with a cap, what fits without it."""
    spec, base = ctx.spec, ctx.base
    parts = [invalid_rows(ctx, "min_gpus", "seq", spec.seqs)]
    if base is None:
        return pl.concat(parts)
    seqs = np.asarray(spec.seqs, dtype=np.float64)
    ns, nh = len(seqs), len(ctx.hardware)
    sets: dict[tuple[bool, bool], LayoutSet] = {}
    pieces: list[tuple[Array, ...]] = []
    start = 0
    for row in range(ctx.rows):
        kind = (bool(base.training[row]), bool(base.experts[row] > 0))
        ls = sets.setdefault(kind, layout_set(spec, *kind))
        s, li = cross(ns, len(ls))
        offsets = start + s * len(ls)  # first row of this (base row, seq) block
        pieces.append((np.full(len(s), row), s, li, offsets, ls.tp[li], ls.pp[li], ls.dp[li], ls.zero[li],
                       ls.ep[li], ls.micro[li], ls.accum[li], np.where(ls.ref[li] >= 0, offsets + ls.ref[li], -1)))
        start += len(s)
    b, s, li, _, tp, pp, dp, zero, ep, micro, accum, ref = (np.concatenate(x) for x in zip(*pieces))
    seq = seqs[s]
    grid = Grid(base, b, {"seq": seq, "batch": micro, "grad_accum": accum, "tp": tp, "pp": pp, "dp": dp,
                          "zero": zero, "ep": ep, "sequence_parallel": 1.0 * sequence_parallel_applies(spec, base.training[b] == 1, tp, seq)})
    bd = evaluate(ctx.formula, grid)
    total = bd.total
    limit = context_limit(base, spec)[b]
    seq_ok = seq <= limit
    layout_ok = ((base.heads[b] % tp == 0) & (base.kv_heads[b] % tp == 0) & (pp <= base.layers[b])
                 & ((base.experts[b] == 0) | (base.experts[b] % ep == 0)))
    gpus = tp * pp * dp
    cost = ctx.cost[b]
    n = len(b)
    group = ctx.row_case[b] * ns + s
    groups = int(group.max()) + 1
    largest = np.zeros(groups)  # each group's largest layout that divides the model
    np.maximum.at(largest, group, np.where(layout_ok, gpus, 0.0))
    most = float(spec.max_gpus) if spec.max_gpus else np.inf
    within = gpus <= most
    fastest = spec.objective == "fastest"
    if fastest:  # the work of every candidate, once; its time per hardware below
        cols = grid.columns()
        work = production_work(cols)
    out_rows, out_h, out_rank, out_ok, out_limit, out_free = [], [], [], [], [], []
    for hi in range(nh):
        cap = ctx.capacity(b, np.full(n, hi))
        saving = np.where(ref >= 0, total[np.maximum(ref, 0)] - total, np.inf)
        earns = (ref < 0) | (saving >= spec.min_saving * cap)
        room = seq_ok & layout_ok & (total <= cap)
        fits = room & earns & within
        head = cap - total
        # where nothing fits, the first is the layout closest to fitting within the cap
        _, answer = first_per_group(group, ~fits, ~layout_ok, ~within, np.where(fits, gpus, 0),
                                    np.where(fits, cost, 0), np.where(fits, -micro, 0), np.where(fits, pp, 0), -head)
        cap_g = np.minimum(largest, most)  # each group's GPU budget
        free = np.full(len(answer), -1)
        if spec.max_gpus:  # what fits without the cap: the fewest GPUs, by the same order
            _, fewest_free = first_per_group(group, ~(room & earns), gpus, cost, -micro, pp, -head)
            free = np.where((room & earns)[fewest_free], fewest_free, -1)
        if fastest:  # the most tokens/s over all the layout's GPUs; the runner-up: the fewest GPUs
            fewest = answer
            if spec.max_gpus is None:  # the fewest whole nodes that fit (module docstring)
                node = float(ctx.hardware[hi].gpus_per_node)
                nodes = np.full(groups, np.inf)
                nodes[group[fewest]] = np.where(fits[fewest], np.ceil(gpus[fewest] / node) * node, np.inf)
                cap_g = np.minimum(cap_g, nodes)
            in_budget = gpus <= cap_g[group]
            rate = step_time(cols, speeds(ctx, b, np.full(n, hi)), ctx.time, work=work).tokens_per_s * gpus
            rate = np.where(np.isfinite(rate), rate, 0.0)
            fits = room & in_budget  # more dp buys speed here: no min_saving
            _, answer = first_per_group(group, ~fits, ~layout_ok, ~in_budget, np.where(fits, -rate, 0),
                                        np.where(fits, gpus, 0), np.where(fits, cost, 0), -head)
            alt = fewest[fits[fewest] & (fewest != answer)]
        else:
            g_of = np.zeros(groups, dtype=np.int64)
            g_of[group[answer]] = answer
            a = g_of[group]  # each row's group answer
            same_layout = (tp == tp[a]) & (pp == pp[a]) & (dp == dp[a]) & (zero == zero[a]) & (ep == ep[a])
            cheaper = fits & (cost < cost[a])  # what more GPUs buy: less recompute or offload
            _, alt1 = first_per_group(group, ~cheaper, gpus, cost, -micro, pp, -head)
            other = fits & ~same_layout & (cost <= cost[a])  # else: another layout, no costlier
            _, alt2 = first_per_group(group, ~other, gpus, cost, -micro, pp, -head)
            alt = np.where(cheaper[alt1], alt1, alt2)
            alt = alt[fits[answer] & (cheaper[alt1] | other[alt2])]
        out_rows += [answer, alt]
        out_ok += [fits[answer], fits[alt]]
        out_h += [np.full(len(answer), hi), np.full(len(alt), hi)]
        out_rank += [np.ones(len(answer)), np.full(len(alt), 2.0)]
        out_limit += [cap_g[group[answer]], cap_g[group[alt]]]
        out_free += [np.where(fits[answer], -1, free), np.full(len(alt), -1)]
    rows = np.concatenate(out_rows)
    h = np.concatenate(out_h)
    rank = np.concatenate(out_rank)
    ok = np.concatenate(out_ok)  # each row's own hardware's verdict, as the selection made it
    budget = np.concatenate(out_limit)
    no_layout = ~_any_layout(layout_ok, group)[group[rows]]
    status = np.where(~seq_ok[rows] | no_layout, "invalid", np.where(ok, "ok", "none_fits"))
    reason = np.where(seq_ok[rows], None, _seq_reason(limit[rows], base.gen_tokens[b[rows]],
                                                      base.learned_positions[b[rows]])).astype(object)
    lay = spec.layouts
    reason = np.where(no_layout & seq_ok[rows], f"no layout in tp={list(lay.tp)} x pp={list(lay.pp)} divides the heads, "
                      "kv heads (with pp up to the layers)", reason).astype(object)
    short = np.flatnonzero(status == "none_fits")
    if short.size:
        layout = {"tp": tp, "pp": pp, "dp": dp, "zero": zero, "ep": ep, "batch": micro, "grad_accum": accum}
        free = np.concatenate(out_free)[short]
        reason[short] = [_shortfall(ctx, b, layout, total, i, c, lim, f) for i, c, lim, f in
                         zip(rows[short], ctx.capacity(b[rows[short]], h[short]), budget[short], free)]
    numbers = {"seq": seq[rows], "limit": budget, "capped": np.zeros(len(rows), dtype=bool)}
    for name, values in (("tp", tp), ("pp", pp), ("dp", dp), ("zero", zero), ("ep", ep), ("batch", micro),
                         ("grad_accum", accum), ("gpus", gpus)):
        numbers[name] = np.where(ok, values[rows], np.nan)
    point = Breakdown(**{t: getattr(bd, t)[rows] for t in TERMS})
    parts.append(frame(ctx, "min_gpus", b[rows], h, status, numbers, point, reason, rank))
    return pl.concat(parts)


def _shortfall(ctx: Context, b: Array, layout: Mapping[str, Array], total: Array, i: int, capacity: float,
               budget: float, free: int) -> str:
    """A none_fits row's reason: 'on 1 GPU (max_gpus=1): the closest (recompute=full) needs X GiB >
    capacity Y GiB; without max_gpus it fits on 32 GPUs (tp8 zero3 dp4, recompute=full)'. `i` is
    the closest grid row within the budget, `free` the fewest-GPUs row without the cap (-1: none)."""
    n = int(budget)
    where = "on 1 GPU" if n == 1 else f"on up to {n:,} GPUs"
    if ctx.spec.max_gpus and n == ctx.spec.max_gpus:
        where += f" (max_gpus={n})"
    how = _layout_words(ctx, b, layout, i)
    text = (f"{where}: the closest{f' ({how})' if how else ''} needs {total[i] / GIB:.2f} GiB > capacity "
            f"{capacity / GIB:.2f} GiB")
    if free >= 0:
        gpus = int(layout["tp"][free] * layout["pp"][free] * layout["dp"][free])
        how = _layout_words(ctx, b, layout, free)
        text += f"; without max_gpus it fits on {gpus} GPU{'s' if gpus > 1 else ''}{f' ({how})' if how else ''}"
    return text


def _layout_words(ctx: Context, b: Array, layout: Mapping[str, Array], i: int) -> str:
    """'tp8 zero3 dp4, recompute=full' for grid row i: its layout and the techniques it uses."""
    parts = layout_parts({k: int(v[i]) for k, v in layout.items()})
    if ctx.base is not None and ctx.base.training[int(b[i])]:
        v = ctx.row_variant[int(b[i])]
        parts += [f"recompute={v.recompute}"] + ([f"offload={v.offload}"] if v.offload != "none" else [])
    return ", ".join(parts)


def _any_layout(layout_ok: Array, group: Array) -> Array:
    out = np.zeros(group.max() + 1, dtype=bool)
    np.logical_or.at(out, group, layout_ok)
    return out


# --- the plot's curves ---------------------------------------------------------------------------

CURVE_BATCHES = (1, 4, 16)


def memory_curves(ctx: Context, points: int = 48) -> pl.DataFrame:
    """Total GiB of each case's cheapest variant at batch 1, 4 and 16 (and the plan's `batches`) on
    a geometric seq grid spanning the plan's seqs, up to the model's context (for the plot)."""
    schema = {"label": pl.String, "model": pl.String, "batch": pl.Int64, "seq": pl.Int64, "total_gib": pl.Float64}
    seqs = ctx.spec.seqs
    lo, hi = (min(seqs), max(seqs)) if min(seqs) < max(seqs) else (max(1, seqs[0] // 8), seqs[0] * 8)
    grid_seq = np.unique(np.concatenate([np.round(np.geomspace(lo, hi, points)), seqs])).astype(np.float64)
    if ctx.base is None or points == 0:
        return pl.DataFrame(schema=schema)
    first = np.flatnonzero(np.r_[True, ctx.row_case[1:] != ctx.row_case[:-1]])  # cheapest variant per case
    batches = np.asarray(sorted({*CURVE_BATCHES, *ctx.spec.batches}), dtype=np.float64)
    r, k, s = cross(len(first), len(batches), len(grid_seq))
    b = first[r]
    seq = grid_seq[s]
    total = total_bytes(ctx.formula, Grid(ctx.base, b, {"seq": seq, "batch": batches[k]}))
    keep = seq <= context_limit(ctx.base, ctx.spec)[b]
    cs = [ctx.cases[i] for i in ctx.row_case[b[keep]]]
    return pl.DataFrame({
        "label": [c.label for c in cs], "model": [c.model for c in cs],
        "batch": batches[k][keep].astype(np.int64), "seq": seq[keep].astype(np.int64),
        "total_gib": total[keep] / GIB,
    }, schema=schema)
