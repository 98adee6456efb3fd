"""The plan's picture: memory per GPU against sequence length, one colour per model, one line
style per batch, one panel per workload x precision; each hardware's capacity is a dashed line
named on the right-hand axis, outside the curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from memsweep.results import write_atomic
from memsweep.units import GIB

if TYPE_CHECKING:
    from memsweep.plan import Plan

BATCH_STYLES = ("-", "--", ":", "-.")


def capacity_lines(plan: Plan, within: float = 0.02) -> list[tuple[str, float]]:
    """One line per capacity; hardware within 2 % of each other (a100-80g, h100-80g) share one."""
    lines: list[tuple[str, float]] = []
    for h, cap in sorted(zip(plan.hardware, plan.capacity_bytes), key=lambda x: x[1]):
        if lines and cap <= lines[-1][1] * (1 + within):
            lines[-1] = (f"{lines[-1][0]} / {h.name}", lines[-1][1])
        else:
            lines.append((h.name, cap))
    return lines


def write_plot(plan: Plan, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    path = Path(path)
    curves = plan.curves
    labels = [sec[0] for sec in plan.sections if curves.filter(pl.col("label") == sec[0]).height] or [""]
    ncols = min(3, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 4.4 * nrows), squeeze=False)
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(plan.models)}
    batches = sorted(set(curves["batch"].to_list())) if curves.height else [1]
    styles = {b: BATCH_STYLES[i % len(BATCH_STYLES)] for i, b in enumerate(batches)}
    caps = capacity_lines(plan)
    for ax, label in zip(axes.flat, labels):
        cur = curves.filter(pl.col("label") == label)
        for m in plan.models:
            for b in batches:
                d = cur.filter((pl.col("model") == m) & (pl.col("batch") == b))
                if d.height:
                    ax.plot(d["seq"], d["total_gib"], color=colors[m], ls=styles[b], lw=1.5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()  # every capacity line inside the panel, below the curves too
        ax.set_ylim(min(lo, min(c for _, c in caps) / GIB / 1.3), max(hi, max(c for _, c in caps) / GIB * 1.3))
        for _, cap in caps:
            ax.axhline(cap / GIB, color="0.45", ls=(0, (4, 3)), lw=0.8, zorder=0)
        right = ax.twinx()  # capacity names as ticks of the right-hand axis: never over a curve
        right.set_yscale("log")
        right.set_ylim(ax.get_ylim())
        right.set_yticks([c / GIB for _, c in caps], [f"{n} {c / GIB:.0f} GiB" for n, c in caps], fontsize=7)
        right.minorticks_off()
        right.tick_params(axis="y", length=0, colors="0.3")
        ax.set_title(f"{label}: memory per GPU (cheapest variant)", fontsize=10)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("memory per GPU (GiB)")
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(labels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[m], lw=2) for m in plan.models]
    handles += [Line2D([], [], color="0.2", ls=styles[b], lw=1.5) for b in batches]
    names = [*plan.models, *(f"batch {b}" for b in batches)]
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 8), fontsize=8, frameon=False)
    fig.suptitle(f"{plan.formula.name}: memory per GPU vs sequence length; dashed: capacity = "
                 f"(memory − reserve) × (1 − {plan.spec.margin:g})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if nrows == 1 else 0.05, 1, 1))
    try:
        return write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    finally:
        plt.close(fig)
