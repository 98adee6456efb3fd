"""Capacity planning: what fits where, and how many GPUs it takes.

For every *case* (model x workload x precision) and every hardware, three questions:

- `max_batch`: the largest micro-batch per GPU that fits, at each sequence length;
- `max_seq`:   the longest sequence that fits, at each configured batch;
- `min_gpus`:  the fewest GPUs (tensor parallel x ZeRO data parallel) whose per-GPU memory fits.

"Fits" means the formula's per-GPU total <= capacity, where capacity is the usable memory
(`memory_mib - reserved_mib`) x (1 - margin). A calibrated formula's `overhead_bytes` is already a
term of its total, so it is counted once, there, and not again in the margin.

The formula is evaluated vectorized over the whole grid: a few base rows built from validated
JobSpecs (`Columns.from_specs`), expanded over seq / batch / layout by numpy index arrays (a
`Grid`), and evaluated chunk by chunk. The largest batch and the longest sequence come from a
binary search run on all rows at once; it is exact because the total is non-decreasing in batch
and seq (tests check it for `detailed`).

Pure: numpy and polars (matplotlib, lazily, for the plot); no hydra, omegaconf or torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from memsweep.columns import Array, Columns, base_params
from memsweep.errors import ConfigError
from memsweep.formulas import TERMS, Breakdown, Formula, get_formula
from memsweep.formulas.techniques import engine_budget_bytes
from memsweep.presets import job_spec, load_preset, model_spec, preset_names, workload_spec
from memsweep.results import write_atomic, write_parquet_atomic, write_text_atomic
from memsweep.specs import ATTENTIONS, RECOMPUTES, Hardware, JobSpec, check_choice, check_int
from memsweep.units import GIB, MIB, SWEEP_DTYPES

CHUNK_ROWS = 16_384
"""Rows per formula call. The formula makes ~100 temporaries per row; in chunks they stay in the
CPU cache: 2.4 M rows/s against 0.4 M rows/s for one 1 M-row call (2-core machine)."""

QUESTIONS = ("max_batch", "max_seq", "min_gpus")
STATUSES = ("ok", "none_fits", "invalid")
PLAN_NAME, MARKDOWN_NAME, PLOT_NAME = "plan.parquet", "plan.md", "plan.png"
VS_MEASURED_NAME = "plan_vs_measured.parquet"
NONE, INVALID = "—", "n/a"

# One row per question x case x hardware x (seq or batch). Declared once, like results.SCHEMA.
PLAN_SCHEMA: dict[str, pl.DataType] = {
    "question": pl.String(),        # max_batch | max_seq | min_gpus
    "model": pl.String(),
    "family": pl.String(),
    "params": pl.Int64(),
    "workload": pl.String(),
    "dtype": pl.String(),
    "precision": pl.String(),       # effective: mixed | pure (as in results.parquet)
    "optimizer": pl.String(),
    "recompute": pl.String(),
    "attention": pl.String(),
    "hardware": pl.String(),
    "hardware_bytes": pl.Int64(),   # usable: (memory_mib - reserved_mib) MiB
    "margin": pl.Float64(),
    "capacity_bytes": pl.Int64(),   # hardware_bytes * (1 - margin): what a plan may fill
    "formula": pl.String(),
    "seq": pl.Int64(),              # given (max_batch, min_gpus) or the answer (max_seq)
    "batch": pl.Int64(),            # the answer (max_batch) or given (max_seq, min_gpus)
    "tp": pl.Int64(),
    "pp": pl.Int64(),
    "dp": pl.Int64(),
    "zero": pl.Int64(),
    "gpus": pl.Int64(),             # tp * pp * dp; the answer of min_gpus
    "limit": pl.Int64(),            # the search's upper bound (max_batch, seq limit, most GPUs)
    "capped": pl.Boolean(),         # the answer is the upper bound: the true one may be larger
    "status": pl.String(),          # ok | none_fits | invalid
    "reason": pl.String(),
    **{f"{t}_bytes": pl.Int64() for t in TERMS},
    "total_bytes": pl.Int64(),
    "total_gib": pl.Float64(),
    "headroom_gib": pl.Float64(),   # (capacity - total) / 2^30; negative: the shortfall
}


# --- the plan's inputs ------------------------------------------------------------------------

@dataclass(frozen=True)
class Layouts:
    """Layouts tried for `min_gpus`: every tp x dp pair, data parallel with this ZeRO stage."""

    tp: tuple[int, ...] = (1, 2, 4, 8)
    dp: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    zero: int = 3

    def __post_init__(self) -> None:
        _check_int_list("layouts.tp", self.tp)
        _check_int_list("layouts.dp", self.dp)
        if isinstance(self.zero, bool) or self.zero not in (0, 1, 2, 3):
            raise ConfigError("layouts.zero", self.zero, "0, 1, 2, 3")


@dataclass(frozen=True)
class PlanSpec:
    """What to plan; every check that can reject user input is here (one-line ConfigError)."""

    models: tuple[str, ...] = ("llama3.2-1b", "llama3-8b", "mistral-7b", "qwen2.5-14b", "llama2-70b")
    hardware: tuple[str, ...] = ("rtx4090-24g", "a100-40g", "a100-80g", "h100-80g", "h200-141g")
    seqs: tuple[int, ...] = (512, 2048, 8192, 32768)
    workloads: tuple[str, ...] = ("train", "lora", "inference")
    precisions: tuple[str, ...] = ("bf16-mixed",)
    """`dtype` or `dtype-mixed` / `dtype-pure`; mixed applies to 16-bit training only, so for
    inference `bf16-mixed` is plain bf16. A bare 16-bit dtype means mixed (the sweep's default)."""
    optimizer: str = "adamw"
    recompute: str = "none"
    attention: str = "sdpa"
    parallel: str = "single"
    """Layout (conf/parallel/) of the max_batch and max_seq tables; memory is per GPU."""
    formula: str = "detailed"
    margin: float = 0.05
    """Safety margin: plan to fill at most (1 - margin) of the usable memory (fragmentation,
    allocator cache, what the formula misses)."""
    reserved_mib: int | None = None
    """MiB kept back on every GPU (CUDA context, driver, workspaces); None: each preset's own."""
    max_batch: int = 4096
    max_seq: int = 1_048_576
    """Search cap for the longest sequence of models without learned positions."""
    batches: tuple[int, ...] = (1,)
    gpus_batch: int = 1
    layouts: Layouts = field(default_factory=Layouts)
    results: str | None = None
    """A results.parquet with measure=cuda rows to compare the predicted boundary with."""

    def __post_init__(self) -> None:
        for key, group in (("models", "model"), ("hardware", "hardware"), ("workloads", "workload")):
            _check_names(key, getattr(self, key), preset_names(group))
        _check_int_list("seqs", self.seqs)
        _check_int_list("batches", self.batches)
        if not isinstance(self.precisions, tuple) or not self.precisions:
            raise ConfigError("precisions", _show(self.precisions), "a non-empty list of dtype[-mixed|-pure]")
        for p in self.precisions:
            parse_precision(p)
        _check_names("optimizer", (self.optimizer,), preset_names("optimizer"))
        _check_names("parallel", (self.parallel,), preset_names("parallel"))
        if self.recompute not in RECOMPUTES:
            raise ConfigError("recompute", self.recompute, RECOMPUTES)
        if self.attention not in ATTENTIONS:
            raise ConfigError("attention", self.attention, ATTENTIONS)
        get_formula(self.formula, key="formula")
        if (isinstance(self.margin, bool) or not isinstance(self.margin, (int, float))
                or not 0 <= self.margin < 1):
            raise ConfigError("margin", self.margin, "a number in [0, 1), e.g. 0.05")
        if self.reserved_mib is not None:
            check_int("reserved_mib", self.reserved_mib, minimum=0)
        for key in ("max_batch", "max_seq", "gpus_batch"):
            check_int(key, getattr(self, key))
        # search bounds far past any GPU, and below what int64 byte counts can hold
        for key, limit in (("max_batch", MAX_BATCH_LIMIT), ("max_seq", MAX_SEQ_LIMIT)):
            if getattr(self, key) > limit:
                raise ConfigError(key, getattr(self, key), f"an integer from 1 to {limit:,}")
        for key, bound in (("gpus_batch", "max_batch"), ("batches", "max_batch"), ("seqs", "max_seq")):
            values, limit = getattr(self, key), getattr(self, bound)
            if max(values if isinstance(values, tuple) else (values,)) > limit:
                raise ConfigError(key, _show(values), f"integers from 1 to {bound}={limit:,}")
        if not isinstance(self.layouts, Layouts):
            raise ConfigError("layouts", self.layouts, "a mapping with tp, dp, zero")
        if self.results is not None and not (isinstance(self.results, str) and Path(self.results).is_file()):
            raise ConfigError("results", self.results, "null or the path of an existing results.parquet")
        self.hardware_specs()  # a reserve larger than a GPU's memory fails here, not later

    def hardware_specs(self) -> list[Hardware]:
        if self.reserved_mib is None:
            return [Hardware(**load_preset("hardware", n)) for n in self.hardware]
        presets = [load_preset("hardware", n, reserved_mib=self.reserved_mib) for n in self.hardware]
        smallest = min(p["memory_mib"] for p in presets)
        if self.reserved_mib >= smallest:
            raise ConfigError("reserved_mib", self.reserved_mib,
                              f"null or an integer >= 0 below the smallest memory_mib={smallest}")
        return [Hardware(**p) for p in presets]

    def capacity_bytes(self, hw: Hardware) -> float:
        return hw.usable_bytes * (1.0 - self.margin)


MAX_BATCH_LIMIT = 2**20
MAX_SEQ_LIMIT = 2**27


def _show(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _check_int_list(key: str, values: object) -> None:
    if not isinstance(values, tuple) or not values:
        raise ConfigError(key, _show(values), "a non-empty list of integers >= 1")
    for v in values:
        check_int(key, v)


def _check_names(key: str, values: object, allowed: list[str]) -> None:
    if not isinstance(values, tuple) or not values:
        raise ConfigError(key, _show(values), f"a non-empty list of: {', '.join(allowed)}")
    for v in values:
        check_choice(key, v, tuple(allowed))


def parse_precision(label: object) -> tuple[str, str]:
    """'bf16-mixed' -> ('bf16', 'mixed'); 'int8' -> ('int8', 'pure'); 'bf16' -> ('bf16', 'mixed')."""
    allowed = "dtype[-mixed|-pure] with dtype in " + ", ".join(SWEEP_DTYPES)
    if not isinstance(label, str):
        raise ConfigError("precisions", label, allowed)
    dtype, _, mode = label.partition("-")
    if dtype not in SWEEP_DTYPES or mode not in ("", "mixed", "pure"):
        raise ConfigError("precisions", label, allowed)
    if mode == "mixed" and dtype not in ("fp16", "bf16"):
        raise ConfigError("precisions", label, f"{dtype} or {dtype}-pure (mixed precision is 16-bit training: fp16, bf16)")
    return dtype, mode or ("mixed" if dtype in ("fp16", "bf16") else "pure")


PLAN_KEYS = tuple(f.name for f in fields(PlanSpec))


def plan_spec_from_dict(values: Mapping[str, Any]) -> PlanSpec:
    """A PlanSpec from plain values (a resolved config): lists become tuples, unknown keys fail."""
    d = dict(values)
    for key in d:
        if key not in PLAN_KEYS:
            raise ConfigError(key, d[key], f"plan keys: {', '.join(PLAN_KEYS)}")
    for key in ("models", "hardware", "seqs", "workloads", "precisions", "batches"):
        if key in d:
            d[key] = tuple(dict.fromkeys(_as_tuple(key, d[key])))  # repeats add nothing
    for key in ("seqs", "batches"):  # tables read left to right, shortest first
        if key in d and all(isinstance(v, int) and not isinstance(v, bool) for v in d[key]):
            d[key] = tuple(sorted(d[key]))
    if "layouts" in d:
        lay = d["layouts"]
        if not isinstance(lay, Mapping):
            raise ConfigError("layouts", lay, "a mapping with tp, dp, zero")
        for k in lay:
            if k not in ("tp", "dp", "zero"):
                raise ConfigError(f"layouts.{k}", lay[k], "layouts keys: tp, dp, zero")
        d["layouts"] = Layouts(**{k: _as_tuple(f"layouts.{k}", v) if k != "zero" else v
                                  for k, v in lay.items()})
    return PlanSpec(**d)


def _as_tuple(key: str, value: object) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise ConfigError(key, value, "a list, e.g. [a, b]")


# --- cases: the base rows ---------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One model x workload x precision; `job` is None when the combination is invalid."""

    model: str
    workload: str
    dtype: str
    precision: str  # effective: mixed | pure
    job: JobSpec | None
    reason: str | None = None

    @property
    def label(self) -> str:
        return f"{self.workload} · {precision_label(self.workload, self.dtype, self.precision)}"


def precision_label(workload: str, dtype: str, precision: str) -> str:
    """'bf16 mixed', 'bf16 pure' (16-bit training); the bare dtype otherwise."""
    training = workload_spec(workload).training
    return f"{dtype} {precision}" if training and dtype in ("fp16", "bf16") else dtype


def cases(spec: PlanSpec) -> list[Case]:
    """Every model x workload x precision, validated as a JobSpec (at seq 1, batch 1); a
    combination the spec rejects (int8 training, tp not dividing the heads) is kept, invalid."""
    out: list[Case] = []
    seen: set[tuple[str, str, str, str]] = set()
    for model in spec.models:
        for wl in spec.workloads:
            for label in spec.precisions:
                dtype, mode = parse_precision(label)
                training = workload_spec(wl).training
                effective = "mixed" if training and mode == "mixed" and dtype in ("fp16", "bf16") else "pure"
                key = (model, wl, dtype, effective)
                if key in seen:  # bf16-mixed and bf16-pure are one case for inference
                    continue
                seen.add(key)
                try:
                    job = job_spec(model, wl=wl, optimizer=spec.optimizer, parallel=spec.parallel,
                                   hardware=spec.hardware[0], seq=1, batch=1, dtype=dtype,
                                   precision=mode, recompute=spec.recompute, attention=spec.attention)
                    out.append(Case(model, wl, dtype, effective, job))
                except ConfigError as exc:
                    out.append(Case(model, wl, dtype, effective, None, str(exc)))
    return out


def seq_limit(c: Columns, max_seq: int) -> Array:
    """Longest valid prompt: learned positions cap seq + gen_tokens at max_positions (`gen_tokens`
    is already 0 for encoders and training); rope models are capped by the plan's `max_seq`."""
    return np.where(c.learned_positions == 1, c.max_positions - c.gen_tokens, float(max_seq))


@cache
def model_params(name: str) -> int:
    """Exact parameter count of a model preset (via a minimal valid job)."""
    return int(base_params(Columns.from_specs([job_spec(name, seq=1)]))[0])


def _case_order(spec: PlanSpec):
    """Sections follow the config: workloads first, then precisions, in the order listed."""
    wl = {w: i for i, w in enumerate(spec.workloads)}
    pr = {parse_precision(p)[0]: i for i, p in reversed(list(enumerate(spec.precisions)))}
    return lambda c: (wl[c.workload], pr[c.dtype], c.precision)


# --- the grid and its evaluation --------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """Rows of a planning grid, never materialised whole: row i is base row `index[i]` with the
    columns named in `values` replaced by `values[name][i]`."""

    base: Columns
    index: Array
    values: Mapping[str, Array] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.index.size)

    def take(self, rows: Array) -> Grid:
        return Grid(self.base, self.index[rows], {k: v[rows] for k, v in self.values.items()})

    def replace(self, **values: Array | float) -> Grid:
        n = len(self)
        new = {k: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)) for k, v in values.items()}
        return Grid(self.base, self.index, {**self.values, **new})

    def columns(self, start: int = 0, stop: int | None = None) -> Columns:
        idx = self.index[start:stop]
        if idx.size and idx[0] == idx[-1] and (idx == idx[0]).all():
            # A chunk inside one base row (the usual case: grids vary seq / batch fastest):
            # zero-copy broadcasts instead of ~50 gathers.
            one = int(idx[0])
            data = {f.name: np.broadcast_to(getattr(self.base, f.name)[one], idx.shape)
                    for f in fields(Columns) if f.name not in self.values}
        else:
            data = {f.name: getattr(self.base, f.name)[idx] for f in fields(Columns)
                    if f.name not in self.values}
        data.update({k: np.ascontiguousarray(v[start:stop]) for k, v in self.values.items()})
        return Columns(**data)


def cross(*sizes: int) -> list[Array]:
    """Index arrays of a cartesian product, first axis slowest (np.repeat / np.tile)."""
    total = math.prod(sizes)
    out, inner, outer = [], total, 1
    for n in sizes:
        inner //= n
        out.append(np.tile(np.repeat(np.arange(n), inner), outer))
        outer *= n
    return out


def evaluate(formula: Formula, grid: Grid, chunk_rows: int = CHUNK_ROWS) -> Breakdown:
    """The formula's breakdown of every grid row, in chunks of `chunk_rows`."""
    parts = [formula(grid.columns(s, s + chunk_rows)) for s in range(0, len(grid), chunk_rows)]
    if not parts:
        return Breakdown.of(np.zeros(0))
    return Breakdown(**{t: np.concatenate([getattr(p, t) for p in parts]) for t in TERMS})


def total_bytes(formula: Formula, grid: Grid, chunk_rows: int = CHUNK_ROWS) -> Array:
    out = np.empty(len(grid))
    for s in range(0, len(grid), chunk_rows):
        out[s:s + chunk_rows] = formula(grid.columns(s, s + chunk_rows)).total
    return out


def largest_fitting(formula: Formula, grid: Grid, key: str, hi: Array, capacity: Array,
                    chunk_rows: int = CHUNK_ROWS) -> Array:
    """Per row, the largest integer `key` in [1, hi] whose total fits `capacity`; 0 when not even
    1 fits (or hi is 0). One binary search over all rows at once, each step evaluating only the
    rows still open; exact because the total is non-decreasing in `key`."""
    hi = np.asarray(hi, dtype=np.int64).copy()
    lo = np.zeros_like(hi)
    capacity = np.broadcast_to(np.asarray(capacity, dtype=np.float64), hi.shape)
    open_rows = np.flatnonzero(lo < hi)
    while open_rows.size:
        mid = (lo[open_rows] + hi[open_rows] + 1) // 2  # > lo, so every step shrinks the interval
        sub = grid.take(open_rows).replace(**{key: mid})
        fits = total_bytes(formula, sub, chunk_rows) <= capacity[open_rows]
        lo[open_rows] = np.where(fits, mid, lo[open_rows])
        hi[open_rows] = np.where(fits, hi[open_rows], mid - 1)
        open_rows = open_rows[lo[open_rows] < hi[open_rows]]
    return lo


# --- the three questions ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Ctx:
    spec: PlanSpec
    formula: Formula
    cases: list[Case]            # the valid ones, in base-row order
    invalid: list[Case]
    base: Columns | None         # one row per valid case; None when there is none
    hardware: list[Hardware]
    capacity: Array              # per hardware


def _context(spec: PlanSpec) -> _Ctx:
    all_cases = cases(spec)
    valid = [c for c in all_cases if c.job is not None]
    base = Columns.from_specs([c.job for c in valid]) if valid else None
    hw = spec.hardware_specs()
    return _Ctx(spec, get_formula(spec.formula, key="formula"), valid,
                [c for c in all_cases if c.job is None], base, hw,
                np.array([spec.capacity_bytes(h) for h in hw]))


def _capacity(ctx: _Ctx, case_idx: Array, hw_idx: Array) -> Array:
    """Per row: the plan's capacity; a serving engine's is at most its own budget, `gpu_util` of
    the memory less the reserve (vLLM's requested memory, the reserve its non-torch share)."""
    cap = ctx.capacity[hw_idx]
    if ctx.base is None or not (ctx.base.serve[case_idx] == 1).any():
        return cap
    memory = np.array([h.memory_bytes for h in ctx.hardware], dtype=np.float64)[hw_idx]
    reserve = np.array([h.reserved_mib * MIB for h in ctx.hardware], dtype=np.float64)[hw_idx]
    engine = engine_budget_bytes(ctx.base.gpu_util[case_idx], memory, reserve)
    return np.where(ctx.base.serve[case_idx] == 1, np.minimum(cap, engine), cap)


def _frame(ctx: _Ctx, question: str, case_idx: Array, hw_idx: Array, status: Array,
           numbers: Mapping[str, Array], breakdown: Breakdown | None, reason: Array | None = None,
           cases_: Sequence[Case] | None = None) -> pl.DataFrame:
    """Assemble plan rows from per-row arrays (NaN = null); terms are null unless status is set."""
    cs = list(ctx.cases if cases_ is None else cases_)
    n = len(case_idx)

    def attr(name: str) -> Array:
        return np.array([getattr(c, name) for c in cs], dtype=object)[case_idx]

    hw = ctx.hardware
    capacity = ctx.capacity[hw_idx] if cases_ is not None else _capacity(ctx, case_idx, hw_idx)
    data: dict[str, Any] = {
        "question": np.full(n, question, dtype=object),
        "model": attr("model"),
        "family": np.array([model_spec(c.model).family for c in cs], dtype=object)[case_idx],
        "params": np.array([model_params(c.model) for c in cs], dtype=np.float64)[case_idx],
        "workload": attr("workload"), "dtype": attr("dtype"), "precision": attr("precision"),
        "optimizer": np.full(n, ctx.spec.optimizer, dtype=object),
        "recompute": np.full(n, ctx.spec.recompute, dtype=object),
        "attention": np.full(n, ctx.spec.attention, dtype=object),
        "hardware": np.array([h.name for h in hw], dtype=object)[hw_idx],
        "hardware_bytes": np.array([h.usable_bytes for h in hw], dtype=np.float64)[hw_idx],
        "margin": np.full(n, float(ctx.spec.margin)),
        "capacity_bytes": np.floor(capacity),
        "formula": np.full(n, ctx.formula.name, dtype=object),
        "status": status.astype(object),
        "reason": reason if reason is not None else np.full(n, None, dtype=object),
    }
    for name in ("seq", "batch", "tp", "pp", "dp", "zero", "gpus", "limit"):
        data[name] = np.asarray(numbers.get(name, np.full(n, np.nan)), dtype=np.float64)
    data["capped"] = np.asarray(numbers.get("capped", np.zeros(n, dtype=bool)), dtype=bool)
    measured = status != "invalid"  # invalid rows are listed, never evaluated
    for t in TERMS:
        term = np.round(getattr(breakdown, t)) if breakdown is not None else np.nan
        data[f"{t}_bytes"] = np.where(measured, term, np.nan)
    total = sum(data[f"{t}_bytes"] for t in TERMS)
    data["total_bytes"] = total
    data["total_gib"] = total / GIB
    data["headroom_gib"] = (capacity - total) / GIB
    return _to_frame(data)


def _to_frame(data: Mapping[str, Any]) -> pl.DataFrame:
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


def _invalid_rows(ctx: _Ctx, question: str, axis_name: str, axis: Sequence[int]) -> pl.DataFrame:
    """Rows for the cases a JobSpec rejected: listed with the reason, nothing evaluated."""
    if not ctx.invalid:
        return pl.DataFrame(schema=PLAN_SCHEMA)
    c_idx, a_idx, h_idx = cross(len(ctx.invalid), len(axis), len(ctx.hardware))
    n = len(c_idx)
    reason = np.array([c.reason for c in ctx.invalid], dtype=object)[c_idx]
    return _frame(ctx, question, c_idx, h_idx, np.full(n, "invalid", dtype=object),
                  {axis_name: np.asarray(axis, dtype=np.float64)[a_idx]}, None, reason, ctx.invalid)


def _seq_reason(limit: Array) -> Array:
    text = np.char.add(np.char.add("seq > ", limit.astype(np.int64).astype(str)),
                       ": learned positions cap seq + gen_tokens at max_positions")
    return text.astype(object)


def max_batch_rows(ctx: _Ctx) -> pl.DataFrame:
    """The largest micro-batch per GPU at each seq, on each hardware (0 → none_fits)."""
    spec, seqs = ctx.spec, np.asarray(ctx.spec.seqs, dtype=np.float64)
    parts = [_invalid_rows(ctx, "max_batch", "seq", spec.seqs)]
    if ctx.cases:
        b, s, h = cross(len(ctx.cases), len(seqs), len(ctx.hardware))
        seq = seqs[s]
        limit = seq_limit(ctx.base, spec.max_seq)[b]
        valid = seq <= limit
        grid = Grid(ctx.base, b, {"seq": seq, "batch": np.ones_like(seq)})
        best = largest_fitting(ctx.formula, grid, "batch", np.where(valid, spec.max_batch, 0), _capacity(ctx, b, h))
        point = evaluate(ctx.formula, grid.replace(batch=np.maximum(best, 1)))
        status = np.where(~valid, "invalid", np.where(best == 0, "none_fits", "ok"))
        reason = np.where(valid, None, _seq_reason(limit)).astype(object)
        numbers = {"seq": seq, "batch": np.where(best > 0, best, np.nan), "limit": np.full(len(b), spec.max_batch),
                   "capped": best == spec.max_batch, **_layout_numbers(ctx.base, b)}
        parts.append(_frame(ctx, "max_batch", b, h, status, numbers, point, reason))
    return _with_shortfall_reason(pl.concat(parts), "batch 1")


def max_seq_rows(ctx: _Ctx) -> pl.DataFrame:
    """The longest sequence that fits at each configured batch, on each hardware."""
    spec, batches = ctx.spec, np.asarray(ctx.spec.batches, dtype=np.float64)
    parts = [_invalid_rows(ctx, "max_seq", "batch", spec.batches)]
    if ctx.cases:
        b, k, h = cross(len(ctx.cases), len(batches), len(ctx.hardware))
        limit = seq_limit(ctx.base, spec.max_seq)[b]
        grid = Grid(ctx.base, b, {"seq": np.ones(len(b)), "batch": batches[k]})
        best = largest_fitting(ctx.formula, grid, "seq", limit, _capacity(ctx, b, h))
        point = evaluate(ctx.formula, grid.replace(seq=np.maximum(best, 1)))
        status = np.where(best == 0, "none_fits", "ok")
        numbers = {"seq": np.where(best > 0, best, np.nan), "batch": batches[k], "limit": limit,
                   "capped": best == limit, **_layout_numbers(ctx.base, b)}
        parts.append(_frame(ctx, "max_seq", b, h, status, numbers, point))
    return _with_shortfall_reason(pl.concat(parts), "seq 1")


def _layout_numbers(base: Columns, b: Array) -> dict[str, Array]:
    tp, pp, dp = base.tp[b], base.pp[b], base.dp[b]
    return {"tp": tp, "pp": pp, "dp": dp, "zero": base.zero[b], "gpus": tp * pp * dp}


def min_gpus_rows(ctx: _Ctx) -> pl.DataFrame:
    """The fewest GPUs at each seq (batch `gpus_batch` per GPU): over every tp x dp layout that
    divides the heads, the smallest tp * dp whose per-GPU total fits; ties go to the layout with
    the most headroom. A none_fits row reports the layout closest to fitting."""
    spec = ctx.spec
    parts = [_invalid_rows(ctx, "min_gpus", "seq", spec.seqs)]
    if ctx.cases:
        lay = spec.layouts
        lt, ld = (np.asarray(v, dtype=np.float64) for v in zip(*[(t, d) for t in lay.tp for d in lay.dp]))
        seqs = np.asarray(spec.seqs, dtype=np.float64)
        nb, ns, nl, nh = len(ctx.cases), len(seqs), len(lt), len(ctx.hardware)
        b, s, li = cross(nb, ns, nl)
        grid = Grid(ctx.base, b, {"seq": seqs[s], "batch": np.full(len(b), float(spec.gpus_batch)),
                                  "tp": lt[li], "dp": ld[li], "zero": np.full(len(b), float(lay.zero)),
                                  "pp": np.ones(len(b)), "sequence_parallel": np.zeros(len(b))})
        bd = evaluate(ctx.formula, grid)
        tot = bd.total.reshape(nb, ns, nl)
        heads, kv = ctx.base.heads[:, None], ctx.base.kv_heads[:, None]
        layout_ok = (heads % lt[None, :] == 0) & (kv % lt[None, :] == 0)          # (nb, nl)
        gpus = lt * ld
        cap = _capacity(ctx, *cross(nb, nh)).reshape(nb, 1, 1, nh)
        fits = layout_ok[:, None, :, None] & (tot[..., None] <= cap)               # (nb, ns, nl, nh)
        score = np.where(fits, gpus[None, None, :, None], np.inf)
        fewest = score.min(axis=2)                                                  # (nb, ns, nh)
        tied = np.where(score == fewest[:, :, None, :], tot[..., None], np.inf)
        choice = tied.argmin(axis=2)
        closest = np.where(layout_ok[:, None, :], tot, np.inf).argmin(axis=2)       # (nb, ns)
        found = np.isfinite(fewest)
        pick = np.where(found, choice, closest[..., None])                          # (nb, ns, nh)
        ob, os_, oh = cross(nb, ns, nh)
        flat = (ob * ns + os_) * nl + pick.reshape(-1)
        point = Breakdown(**{t: getattr(bd, t)[flat] for t in TERMS})
        seq = seqs[os_]
        limit = seq_limit(ctx.base, spec.max_seq)[ob]
        valid = seq <= limit
        ok = found.reshape(-1) & valid
        status = np.where(~valid, "invalid", np.where(ok, "ok", "none_fits"))
        reason = np.where(valid, None, _seq_reason(limit)).astype(object)
        no_layout = ~layout_ok.any(axis=1)[ob]
        status = np.where(no_layout, "invalid", status)
        reason = np.where(no_layout, f"no tp in layouts.tp={list(lay.tp)} divides both the heads "
                          "and the kv heads", reason).astype(object)
        numbers = {"seq": seq, "batch": np.full(len(ob), float(spec.gpus_batch)),
                   "limit": np.full(len(ob), gpus.max()), "capped": np.zeros(len(ob), dtype=bool)}
        for name, values in (("tp", lt), ("dp", ld)):
            numbers[name] = np.where(ok, values[pick.reshape(-1)], np.nan)
        numbers["pp"] = np.where(ok, 1.0, np.nan)
        numbers["zero"] = np.where(ok, float(lay.zero), np.nan)
        numbers["gpus"] = numbers["tp"] * numbers["dp"]
        parts.append(_frame(ctx, "min_gpus", ob, oh, status, numbers, point, reason))
    largest = max(spec.layouts.tp) * max(spec.layouts.dp)
    return _with_shortfall_reason(pl.concat(parts), f"every layout up to {largest} GPUs (closest shown)")


def _with_shortfall_reason(df: pl.DataFrame, what: str) -> pl.DataFrame:
    """none_fits rows say by how much: '<what> needs X GiB > capacity Y GiB'."""
    text = pl.format(f"{what} needs {{}} GiB > capacity {{}} GiB", pl.col("total_gib").round(2),
                     (pl.col("capacity_bytes") / GIB).round(2))
    return df.with_columns(
        reason=pl.when(pl.col("status") == "none_fits").then(text).otherwise(pl.col("reason")))


def memory_curves(ctx: _Ctx, points: int = 48) -> pl.DataFrame:
    """Total GiB at batch 1 on a geometric seq grid spanning the plan's seqs (for the plot)."""
    seqs = ctx.spec.seqs
    lo, hi = (min(seqs), max(seqs)) if min(seqs) < max(seqs) else (max(1, seqs[0] // 8), seqs[0] * 8)
    grid_seq = np.unique(np.concatenate([np.round(np.geomspace(lo, hi, points)), seqs])).astype(np.float64)
    if not ctx.cases:
        return pl.DataFrame(schema={"label": pl.String, "model": pl.String, "seq": pl.Int64,
                                    "total_gib": pl.Float64})
    b, s = cross(len(ctx.cases), len(grid_seq))
    seq = grid_seq[s]
    total = total_bytes(ctx.formula, Grid(ctx.base, b, {"seq": seq, "batch": np.ones(len(b))}))
    keep = seq <= seq_limit(ctx.base, ctx.spec.max_seq)[b]
    return pl.DataFrame({
        "label": [ctx.cases[i].label for i in b[keep]],
        "model": [ctx.cases[i].model for i in b[keep]],
        "seq": seq[keep].astype(np.int64),
        "total_gib": total[keep] / GIB,
    })


# --- against measurement ----------------------------------------------------------------------

CONFIG_KEYS = ("model", "workload", "seq", "batch", "dtype", "precision", "optimizer", "optimizer_impl",
               "recompute", "attention", "tp", "pp", "dp", "zero", "sequence_parallel", "hardware",
               "gen_tokens", "lora_rank")
VERDICTS = {(True, True): "fits, ran", (True, False): "fits, but oom (optimistic)",
            (False, True): "does not fit, but ran (conservative)", (False, False): "does not fit, oom"}


@dataclass(frozen=True)
class Comparison:
    """Predicted fits (the plan's rule) against measured cuda ok / oom."""

    rows: pl.DataFrame       # one per measured configuration
    confusion: pl.DataFrame  # predicted (fits / does not fit) x measured (ok / oom) counts
    boundary: pl.DataFrame   # per configuration without batch: measured bracket vs predicted max batch
    skipped: pl.DataFrame    # measured rows the planner could not rebuild, with the reason


def compare_measured(results: pl.DataFrame, spec: PlanSpec) -> Comparison:
    """For every measured cuda row (status ok or oom), rebuild its JobSpec, evaluate the plan's
    formula on all of them at once, and compare `total <= capacity` with what happened."""
    from memsweep.fit import spec_of_row

    needed = ["measure_backend", "status", "measured_peak_bytes", "model", "workload", "seq", "batch",
              "dtype", "precision", "recompute", "hardware"]
    missing = [c for c in needed if c not in results.columns]
    if missing:
        raise ConfigError("results", spec.results or "table", f"a results table (missing column {missing[0]})")
    measured = results.filter((pl.col("measure_backend") == "cuda") & pl.col("status").is_in(["ok", "oom"]))
    keys = [k for k in CONFIG_KEYS if k in measured.columns]
    # One row per job: a sweep writes a job's measurement on each formula's row.
    measured = measured.unique(subset=keys, keep="first", maintain_order=True)
    jobs, kept, skipped = [], [], []
    for i, row in enumerate(measured.iter_rows(named=True)):
        try:
            jobs.append(spec_of_row(row))
            kept.append(i)
        except Exception as exc:  # a row the planner cannot rebuild is listed, never fatal
            skipped.append({"model": row.get("model"), "seq": row.get("seq"), "batch": row.get("batch"),
                            "hardware": row.get("hardware"), "reason": str(exc).splitlines()[0]})
    known = {h.name: h for h in spec.hardware_specs()}
    formula = get_formula(spec.formula, key="formula")
    rows = (measured.with_row_index("_i").filter(pl.col("_i").is_in(kept))
            .select("model", "workload", "seq", "batch", "dtype", "precision", "recompute", "hardware",
                    pl.col("status").alias("measured_status"), "measured_peak_bytes"))
    total = formula(Columns.from_specs(jobs)).total if jobs else np.zeros(0)
    capacity = np.array([spec.capacity_bytes(known.get(j.hardware.name) or _plan_hardware(j.hardware, spec))
                         for j in jobs], dtype=np.float64)
    predicted = total <= capacity
    ran = (rows["measured_status"] == "ok").to_numpy().astype(bool)
    fits, ok = pl.col("predicted_fits"), pl.col("measured_fits")
    verdict = pl.lit(None, dtype=pl.String)
    for (p, r), text in VERDICTS.items():
        verdict = pl.when((fits == p) & (ok == r)).then(pl.lit(text)).otherwise(verdict)
    table = rows.with_columns(
        pl.Series("predicted_total_bytes", np.round(total), dtype=pl.Float64).cast(pl.Int64),
        pl.Series("capacity_bytes", np.floor(capacity), dtype=pl.Float64).cast(pl.Int64),
        pl.Series("predicted_fits", predicted, dtype=pl.Boolean),
        pl.Series("measured_fits", ran, dtype=pl.Boolean),
    ).with_columns(agree=fits == ok, verdict=verdict)
    confusion = pl.DataFrame({
        "predicted": ["fits", "does not fit"],
        "measured_ok": [int((predicted & ran).sum()), int((~predicted & ran).sum())],
        "measured_oom": [int((predicted & ~ran).sum()), int((~predicted & ~ran).sum())],
    })
    boundary = _boundary(table, jobs, formula, capacity, spec.max_batch)
    skipped_df = pl.DataFrame(skipped, schema={"model": pl.String, "seq": pl.Int64, "batch": pl.Int64,
                                               "hardware": pl.String, "reason": pl.String})
    return Comparison(table, confusion, boundary, skipped_df)


def _plan_hardware(hw: Hardware, spec: PlanSpec) -> Hardware:
    """A measured row's hardware that is not in the plan: its preset, with the plan's reserve."""
    return hw if spec.reserved_mib is None else replace(hw, reserved_mib=spec.reserved_mib)


def _boundary(table: pl.DataFrame, jobs: list[JobSpec], formula: Formula, capacity: Array,
              max_batch: int) -> pl.DataFrame:
    """Group measured rows by everything but batch: the measured bracket (largest ok batch,
    smallest oom batch) against the predicted largest batch, found by the same search."""
    by = ["model", "workload", "seq", "dtype", "precision", "recompute", "hardware"]
    if table.height == 0:
        return pl.DataFrame(schema={**{k: table.schema[k] for k in by}, "measured_max_ok": pl.Int64,
                                    "measured_min_oom": pl.Int64, "predicted_max_batch": pl.Int64,
                                    "predicted_boundary": pl.String})
    t = table.with_row_index("row")
    groups = (t.group_by(by, maintain_order=True)
              .agg(pl.col("row").first(),
                   pl.col("batch").filter(pl.col("measured_fits")).max().alias("measured_max_ok"),
                   pl.col("batch").filter(~pl.col("measured_fits")).min().alias("measured_min_oom")))
    first = groups["row"].to_numpy()
    base = Columns.from_specs([jobs[i] for i in first])
    grid = Grid(base, np.arange(len(first)), {"batch": np.ones(len(first))})
    best = largest_fitting(formula, grid, "batch", np.full(len(first), max_batch), capacity[first])
    g = groups.with_columns(predicted_max_batch=pl.Series(best.astype(np.int64))).drop("row")
    pred, ok, oom = pl.col("predicted_max_batch"), pl.col("measured_max_ok"), pl.col("measured_min_oom")
    where = (pl.when(ok.is_not_null() & (pred < ok)).then(pl.lit("below measured (conservative)"))
             .when(oom.is_not_null() & (pred >= oom)).then(pl.lit("above measured (optimistic)"))
             .otherwise(pl.lit("within measured bracket")))
    return g.with_columns(predicted_boundary=where)


# --- the plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    spec: PlanSpec
    table: pl.DataFrame        # PLAN_SCHEMA rows
    curves: pl.DataFrame       # label, model, seq, total_gib at batch 1 (the plot)
    sections: tuple[tuple[str, str, str, str], ...]  # (label, workload, dtype, precision), in order
    models: tuple[str, ...]
    hardware: tuple[Hardware, ...]
    capacity_bytes: tuple[float, ...]
    formula: Formula
    invalid: tuple[Case, ...]
    comparison: Comparison | None = None


def make_plan(spec: PlanSpec, results: pl.DataFrame | None = None) -> Plan:
    """Every question for every case and hardware; compared with measurement when results are
    given (or `spec.results` names a file)."""
    ctx = _context(spec)
    table = pl.concat([max_batch_rows(ctx), max_seq_rows(ctx), min_gpus_rows(ctx)])
    if results is None and spec.results is not None:
        try:
            results = pl.read_parquet(spec.results)
        except Exception as exc:
            why = f"a results.parquet polars can read ({type(exc).__name__})"
            raise ConfigError("results", spec.results, why) from None
    comparison = compare_measured(results, spec) if results is not None else None
    ordered = sorted([*ctx.cases, *ctx.invalid], key=_case_order(spec))
    sections = tuple(dict.fromkeys((c.label, c.workload, c.dtype, c.precision) for c in ordered))
    return Plan(spec, table, memory_curves(ctx), sections, spec.models, tuple(ctx.hardware),
                tuple(float(c) for c in ctx.capacity), ctx.formula, tuple(ctx.invalid), comparison)


# --- Markdown -----------------------------------------------------------------------------------

def _int(v: int) -> str:
    return f"{v:,}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _cell(row: Mapping[str, Any], answer: str, max_seq: int) -> str:
    if row["status"] == "invalid":
        return INVALID
    if row["status"] == "none_fits":
        return NONE
    if not row["capped"]:
        return _int(row[answer])
    # At the bound: a search cap (more may fit) or, for learned positions, all the model takes.
    hard_limit = answer == "seq" and row["limit"] != max_seq
    return f"{_int(row[answer])} (max)" if hard_limit else f"≥{_int(row[answer])}"


def _layout(row: Mapping[str, Any]) -> str:
    parts = []
    if row["tp"] > 1:
        parts.append(f"tp{row['tp']}")
    if row["dp"] > 1:
        parts.append(f"zero{row['zero']} dp{row['dp']}" if row["zero"] else f"dp{row['dp']}")
    return f"{row['gpus']} ({' '.join(parts)})" if parts else str(row["gpus"])


def overhead_note(formula: Formula) -> str:
    overhead = getattr(formula.constants, "overhead_bytes", None)
    if overhead is None:
        return f"`{formula.name}` has no overhead term"
    if overhead == 0:
        return f"`{formula.name}` has overhead_bytes = 0 (uncalibrated)"
    return (f"`{formula.name}`'s calibrated overhead_bytes = {overhead / GIB:.2f} GiB is part of "
            "every total (not added again)")


def render_markdown(plan: Plan) -> str:
    s, t = plan.spec, plan.table
    hw_names = [h.name for h in plan.hardware]
    hw_head = [f"{h.name} ({c / GIB:.1f} GiB)" for h, c in zip(plan.hardware, plan.capacity_bytes)]
    seq_text = " / ".join(_int(x) for x in s.seqs)
    lay = s.layouts
    lines = [
        "# Capacity plan", "",
        f"Formula `{s.formula}`; {overhead_note(plan.formula)}. Optimizer {s.optimizer}, recompute "
        f"{s.recompute}, attention {s.attention}; parallel layout `{s.parallel}` for the batch and "
        "sequence tables. Memory is per GPU.", "",
        f"Capacity = (memory − reserved) × (1 − margin), margin = {s.margin:g}: the reserve is "
        "what the CUDA context, driver and workspaces keep; the margin leaves room for allocator "
        "fragmentation and cache, and for what the formula misses.", "",
    ]
    lines += _table(["hardware", "memory MiB", "reserved MiB", "usable GiB", "capacity GiB"],
                    [[h.name, _int(h.memory_mib), _int(h.reserved_mib), f"{h.usable_bytes / GIB:.2f}",
                      f"{c / GIB:.2f}"] for h, c in zip(plan.hardware, plan.capacity_bytes)])
    lines += ["", f"Cells: `{NONE}` = not even the smallest configuration fits; `{INVALID}` = not a "
              "valid configuration (see Excluded); `≥N` = the search limit (max_batch, max_seq) was "
              "reached; `N (max)` = the model's learned positions allow no longer sequence.", ""]
    for label, workload, dtype, precision in plan.sections:
        sec = t.filter((pl.col("workload") == workload) & (pl.col("dtype") == dtype)
                       & (pl.col("precision") == precision))
        if (sec["status"] == "invalid").all():  # listed under Excluded, no table of n/a
            continue
        lines += [f"## {label}", ""]
        serve = workload_spec(workload).kind == "serve"
        if serve:  # a serving engine's batch is its concurrent sequences, in its own budget
            lines += [f"Concurrent sequences at context {seq_text} (the paged KV cache in `gpu_util` of the "
                      "memory, less the reserve, weights, the profiled prefill peak and graphs):", ""]
        else:
            lines += [f"Largest batch per GPU at seq {seq_text}:", ""]
        lines += _answer_table(sec, "max_batch", "batch", "seq", plan.models, hw_names, hw_head, s.max_seq)
        lines += [f"Longest {'context of one sequence' if serve else 'sequence'} at batch "
                  f"{' / '.join(map(str, s.batches))}:", ""]
        lines += _answer_table(sec, "max_seq", "seq", "batch", plan.models, hw_names, hw_head, s.max_seq)
        mg = sec.filter(pl.col("question") == "min_gpus")
        lines += [f"Fewest GPUs at batch {s.gpus_batch} per GPU (tp ∈ {{{', '.join(map(str, lay.tp))}}} "
                  f"× ZeRO-{lay.zero} dp ∈ {{{', '.join(map(str, lay.dp))}}}), and the headroom left per GPU:", ""]
        rows = []
        for m in plan.models:
            for q in s.seqs:
                sel = mg.filter((pl.col("model") == m) & (pl.col("seq") == q))
                by_hw = {r["hardware"]: r for r in sel.iter_rows(named=True)}
                cells = []
                for h in hw_names:
                    r = by_hw.get(h)
                    if r is None or r["status"] != "ok":
                        cells.append(INVALID if r is None or r["status"] == "invalid" else NONE)
                    else:
                        cells.append(f"{_layout(r)}, +{r['headroom_gib']:.1f} GiB")
                rows.append([m, _int(q), *cells])
        lines += _table(["model", "seq", *hw_head], rows) + [""]
    lines += _excluded(plan)
    if plan.comparison is not None:
        lines += _measured_section(plan)
    return "\n".join(lines).rstrip() + "\n"


def _answer_table(sec: pl.DataFrame, question: str, answer: str, across: str, models: Sequence[str],
                  hw_names: Sequence[str], hw_head: Sequence[str], max_seq: int) -> list[str]:
    """Rows: models; columns: hardware; a cell lists the answers across `across`, e.g. '8 / 2 / —'."""
    q = sec.filter(pl.col("question") == question)
    rows = []
    for m in models:
        cells = [" / ".join(_cell(r, answer, max_seq) for r in
                            q.filter((pl.col("model") == m) & (pl.col("hardware") == h))
                            .sort(across).iter_rows(named=True)) for h in hw_names]
        rows.append([m, *cells])
    return _table(["model", *hw_head], rows) + [""]


def _excluded(plan: Plan) -> list[str]:
    bad = (plan.table.filter(pl.col("status") == "invalid")
           .group_by(["model", "workload", "dtype", "precision", "reason"], maintain_order=True)
           .agg(pl.col("seq").drop_nulls().unique().sort()))
    if bad.height == 0:
        return []
    lines = ["## Excluded (not valid configurations)", ""]
    for r in bad.iter_rows(named=True):
        where = f" at seq {', '.join(_int(x) for x in r['seq'])}" if r["reason"].startswith("seq >") else ""
        label = precision_label(r["workload"], r["dtype"], r["precision"])
        lines.append(f"- {r['model']} · {r['workload']} · {label}{where}: {r['reason']}")
    return [*lines, ""]


def _measured_section(plan: Plan) -> list[str]:
    c = plan.comparison
    assert c is not None
    rows = c.rows
    lines = ["## Against measurement", "",
             f"{rows.height} measured cuda configurations ({int(rows['measured_fits'].sum())} ok, "
             f"{int((~rows['measured_fits']).sum())} oom) from `{plan.spec.results or 'results'}`; predicted "
             f"with `{plan.formula.name}` and the plan's capacity (margin {plan.spec.margin:g}).", ""]
    lines += _table(["predicted \\ measured", "ok", "oom"],
                    [[r["predicted"], str(r["measured_ok"]), str(r["measured_oom"])]
                     for r in c.confusion.iter_rows(named=True)]) + [""]
    if c.boundary.height:
        lines += ["Largest batch: measured bracket against the plan's boundary:", ""]
        lines += _table(["model", "workload", "seq", "dtype", "hardware", "largest ok", "smallest oom",
                         "predicted largest", "predicted boundary"],
                        [[r["model"], r["workload"], _int(r["seq"]), r["dtype"], r["hardware"],
                          "—" if r["measured_max_ok"] is None else str(r["measured_max_ok"]),
                          "—" if r["measured_min_oom"] is None else str(r["measured_min_oom"]),
                          str(r["predicted_max_batch"]), r["predicted_boundary"]]
                         for r in c.boundary.iter_rows(named=True)]) + [""]
    disagree = rows.filter(~pl.col("agree"))
    if rows.height == 0:
        lines += ["No measured cuda rows with status ok or oom to compare.", ""]
    elif disagree.height:
        lines += ["Rows that disagree:", ""]
        lines += _table(["model", "workload", "seq", "batch", "dtype", "hardware", "measured peak GiB",
                         "predicted GiB", "capacity GiB", "verdict"],
                        [[r["model"], r["workload"], _int(r["seq"]), str(r["batch"]), r["dtype"], r["hardware"],
                          "—" if r["measured_peak_bytes"] is None else f"{r['measured_peak_bytes'] / GIB:.2f}",
                          f"{r['predicted_total_bytes'] / GIB:.2f}", f"{r['capacity_bytes'] / GIB:.2f}",
                          r["verdict"]] for r in disagree.iter_rows(named=True)]) + [""]
    else:
        lines += ["Every measured row agrees with the prediction.", ""]
    if c.skipped.height:
        lines += [f"Skipped {c.skipped.height} measured rows the planner could not rebuild:", ""]
        lines += [f"- {r['model']} seq={r['seq']} batch={r['batch']} {r['hardware']}: {r['reason']}"
                  for r in c.skipped.iter_rows(named=True)] + [""]
    return lines


# --- files --------------------------------------------------------------------------------------

def _capacity_lines(plan: Plan, within: float = 0.02) -> list[tuple[str, float]]:
    """One line per capacity; hardware within 2 % of each other (a100-80g, h100-80g) share one."""
    lines: list[tuple[str, float]] = []
    for h, cap in sorted(zip(plan.hardware, plan.capacity_bytes), key=lambda x: x[1]):
        if lines and cap <= lines[-1][1] * (1 + within):
            lines[-1] = (f"{lines[-1][0]} / {h.name}", lines[-1][1])
        else:
            lines.append((h.name, cap))
    return lines


def write_plot(plan: Plan, path: Path) -> Path:
    """Memory at batch 1 vs seq, one line per model, one panel per workload · precision, with a
    dashed line at each hardware's capacity (after reserve and margin)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    path = Path(path)
    labels = [sec[0] for sec in plan.sections if plan.curves.filter(pl.col("label") == sec[0]).height] or [""]
    ncols = min(3, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(plan.models)}
    capacity_lines = _capacity_lines(plan)
    for ax, label in zip(axes.flat, labels):
        cur = plan.curves.filter(pl.col("label") == label)
        for m in plan.models:
            d = cur.filter(pl.col("model") == m)
            if d.height:
                ax.plot(d["seq"], d["total_gib"], color=colors[m], label=m, lw=1.6)
        for name, cap in capacity_lines:
            ax.axhline(cap / GIB, color="0.45", ls="--", lw=0.8)
            ax.annotate(name, (0.01, cap / GIB), xycoords=("axes fraction", "data"),
                        fontsize=7, color="0.3", va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("memory per GPU at batch 1 (GiB)")
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(labels):]:
        ax.set_visible(False)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6) or 1, fontsize=8, frameon=False)
    fig.suptitle(f"{plan.formula.name}: memory vs sequence length "
                 f"(capacity = usable × (1 − {plan.spec.margin:g}))",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07 if nrows == 1 else 0.04, 1, 1))
    try:
        return write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    finally:
        plt.close(fig)


def write_outputs(plan: Plan, out_dir: Path) -> dict[str, Path]:
    """plan.parquet, plan.md, plan.png (and plan_vs_measured.parquet), each written atomically."""
    out = Path(out_dir)
    paths = {
        "parquet": write_parquet_atomic(plan.table, out / PLAN_NAME),
        "markdown": write_text_atomic(render_markdown(plan), out / MARKDOWN_NAME),
        "png": write_plot(plan, out / PLOT_NAME),
    }
    if plan.comparison is not None:
        paths["vs_measured"] = write_parquet_atomic(plan.comparison.rows, out / VS_MEASURED_NAME)
    return paths
