"""Capacity planning: what fits where, and how many GPUs it takes, searched over the knobs people
turn (recompute, offload, tp / pp / dp with ZeRO, ep, micro-batch x accumulation).

The package, one file per step, so the next knob has one obvious place:

- `spec`     the plan's inputs (conf/plan.yaml) and their one-line errors;
- `cases`    model x workload x precision, each variant (recompute x offload) one JobSpec;
- `grid`     planning grids evaluated chunk by chunk, and the exact binary search;
- `search`   the three questions (max_batch, max_seq, min_gpus) and the order answers follow;
- `measured` the plan against measured cuda ok / oom;
- `render`   Markdown; `plot` the PNG; `ask` the one-line question.

"Fits" is memsweep.capacity's definition (the sweep's `fits` too). Pure: numpy and polars
(matplotlib lazily, for the plot); no hydra, omegaconf or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from memsweep.errors import ConfigError
from memsweep.formulas import Formula
from memsweep.plan.cases import Case, case_order, context_limit
from memsweep.plan.grid import CHUNK_ROWS, Grid, cross, evaluate, largest_fitting, total_bytes
from memsweep.plan.measured import Comparison, compare_measured
from memsweep.plan.plot import write_plot
from memsweep.plan.render import INVALID, NONE, render_markdown
from memsweep.plan.search import (
    PLAN_SCHEMA, QUESTIONS, STATUSES, context, max_batch_rows, max_seq_rows, memory_curves, min_gpus_rows,
)
from memsweep.plan.spec import PLAN_KEYS, Layouts, PlanSpec, parse_precision, plan_spec_from_dict
from memsweep.results import write_parquet_atomic, write_text_atomic
from memsweep.specs import Hardware

PLAN_NAME, MARKDOWN_NAME, PLOT_NAME = "plan.parquet", "plan.md", "plan.png"
VS_MEASURED_NAME = "plan_vs_measured.parquet"


@dataclass(frozen=True)
class Plan:
    spec: PlanSpec
    table: pl.DataFrame        # PLAN_SCHEMA rows
    curves: pl.DataFrame       # label, model, batch, seq, total_gib (the plot)
    sections: tuple[tuple[str, str, str, str], ...]  # (label, workload, dtype, precision), in order
    models: tuple[str, ...]
    hardware: tuple[Hardware, ...]
    capacity_bytes: tuple[float, ...]
    formula: Formula
    invalid: tuple[Case, ...]
    comparison: Comparison | None = None


def make_plan(spec: PlanSpec, results: pl.DataFrame | None = None,
              questions: tuple[str, ...] = QUESTIONS, with_curves: bool = True) -> Plan:
    """The questions for every case and hardware; compared with measurement when results are
    given (or `spec.results` names a file)."""
    ctx = context(spec)
    run = {"max_batch": max_batch_rows, "max_seq": max_seq_rows, "min_gpus": min_gpus_rows}
    table = pl.concat([run[q](ctx) for q in questions])
    if results is None and spec.results is not None:
        try:
            results = pl.read_parquet(spec.results)
        except Exception as exc:
            why = f"a results.parquet polars can read ({type(exc).__name__})"
            raise ConfigError("results", spec.results, why) from None
    comparison = compare_measured(results, spec) if results is not None else None
    ordered = sorted(ctx.cases, key=case_order(spec))
    sections = tuple(dict.fromkeys((c.label, c.workload, c.dtype, c.precision) for c in ordered))
    curves = memory_curves(ctx) if with_curves else memory_curves(ctx, points=0)
    return Plan(spec, table, curves, sections, spec.models, tuple(ctx.hardware),
                tuple(spec.capacity_bytes(h) for h in ctx.hardware), ctx.formula, tuple(ctx.invalid), comparison)


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


__all__ = [
    "CHUNK_ROWS", "INVALID", "MARKDOWN_NAME", "NONE", "PLAN_KEYS", "PLAN_NAME", "PLAN_SCHEMA", "PLOT_NAME",
    "QUESTIONS", "STATUSES", "VS_MEASURED_NAME", "Comparison", "Grid", "Layouts", "Plan", "PlanSpec",
    "compare_measured", "context_limit", "cross", "evaluate", "largest_fitting", "make_plan", "parse_precision",
    "plan_spec_from_dict", "render_markdown", "total_bytes", "write_outputs", "write_plot",
]
