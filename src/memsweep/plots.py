"""PNG figures for fit errors (matplotlib, imported lazily with the Agg backend: no screen).

Every figure and panel says in its title what it shows and from how many rows. Within a report a
model keeps one colour and a workload one marker in every figure (`colours`, `markers`). Error
axes are symmetric around 0 and scaled to the data's spread, never narrower than ±1 %
(`error_limits`), so an exact formula is a flat line at 0 on a readable scale, not a ±0.001 % one;
a title says so when every error is below 0.05 %. The `*_figure` functions build a figure and
return it (for tests and callers that want to change it); the others also write it atomically.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from memsweep.fit import ERROR
from memsweep.results import write_atomic
from memsweep.units import GIB

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ERROR_FLOOR_PCT = 1.0   # narrowest error axis: ±1 %
ERROR_PAD = 1.15        # the largest |error| sits at 87 % of the half-range
EXACT_PCT = 0.05        # below this everywhere, a title says "every error below 0.05 %"
SYMLOG_FROM = 20.0      # a heatmap's colours (and a wide error axis) go symmetric-log past ±20 %
SYMLOG_AXIS = 200.0     # an error axis wider than ±200 % goes symmetric-log (one outlier hides no spread)
LOG_SPAN = 10.0         # predicted-vs-measured axes go log when max / min reaches this

# matplotlib's tab10 / tab20, spelled out so that choosing colours does not import matplotlib
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
         "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
TAB20 = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896",
         "#9467bd", "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7",
         "#bcbd22", "#dbdb8d", "#17becf", "#9edae5")
WORKLOAD_ORDER = ("train", "lora", "qlora", "inference", "serve")
WORKLOAD_MARKERS = {"train": "o", "lora": "s", "qlora": "D", "inference": "^", "serve": "v"}
OTHER_MARKERS = ("P", "X", "*", "h", "<", ">", "p")
GUIDE = {"color": "black", "lw": 0.8, "zorder": 2}   # y = x and the zero line: not a model's colour


# ---- pure helpers (no matplotlib) -------------------------------------------------------------

def _finite(values: Iterable[float] | pl.Series | np.ndarray) -> np.ndarray:
    a = np.asarray(values.to_numpy() if isinstance(values, pl.Series) else list(values), dtype=float)
    return a[np.isfinite(a)]


def error_limits(values, floor: float = ERROR_FLOOR_PCT, pad: float = ERROR_PAD) -> tuple[float, float]:
    """(-h, h) with h = max(|error|) x pad, at least `floor`: symmetric around 0, covering every
    finite value with room to spare. No finite value gives (-floor, floor)."""
    a = _finite(values)
    half = max(float(np.abs(a).max()) * pad if a.size else 0.0, floor)
    return -half, half


def exact_note(values, threshold: float = EXACT_PCT) -> str:
    """' (every error below 0.05 %)' when all finite |values| are below the threshold, else ''."""
    a = _finite(values)
    return f" (every error below {threshold:g} %)" if a.size and float(np.abs(a).max()) < threshold else ""


def colours(names: Iterable[str]) -> dict[str, str]:
    """One colour per distinct name, assigned in sorted order: the same set of names maps the same
    way whatever order or repetition they come in (so every figure built from one table agrees).
    tab10 up to 10 names, tab20 up to 20, then the cycle repeats."""
    unique = sorted({str(n) for n in names})
    palette = TAB10 if len(unique) <= len(TAB10) else TAB20
    return {n: palette[i % len(palette)] for i, n in enumerate(unique)}


def ordered_workloads(names: Iterable[str]) -> list[str]:
    """Distinct workloads, the known ones in a fixed order (train, lora, qlora, inference, serve),
    any others after them, sorted."""
    unique = {str(n) for n in names}
    return [w for w in WORKLOAD_ORDER if w in unique] + sorted(unique - set(WORKLOAD_ORDER))


def markers(workloads: Iterable[str]) -> dict[str, str]:
    """A marker per workload: fixed for the known ones, the rest from a list in sorted order."""
    extra = sorted({str(w) for w in workloads} - set(WORKLOAD_MARKERS))
    out = {w: m for w, m in WORKLOAD_MARKERS.items()}
    out.update({w: OTHER_MARKERS[i % len(OTHER_MARKERS)] for i, w in enumerate(extra)})
    return {str(w): out[str(w)] for w in workloads}


def square_limits(values) -> tuple[float, float, bool]:
    """(lo, hi, log) for both axes of a predicted-vs-measured panel: one range covering every
    positive value, log when it spans LOG_SPAN or more, padded so no point sits on the frame."""
    a = _finite(values)
    a = a[a > 0]
    if not a.size:
        return 0.0, 1.0, False
    lo, hi = float(a.min()), float(a.max())
    if hi / lo >= LOG_SPAN:
        return lo / 1.4, hi * 1.4, True
    pad = 0.06 * (hi - lo) if hi > lo else 0.05 * hi
    return max(lo - pad, 0.0), hi + pad, False


def fmt_pct(v: float) -> str:
    """A signed percentage for a title: '-84 %', '+3.15 %', '0.00 %' (no sign once it rounds to 0)."""
    if abs(v) >= 10:
        return f"{v:+.0f} %"
    return "0.00 %" if round(v, 2) == 0 else f"{v:+.2f} %"


def _spread(e: pl.Series) -> str:
    """'median -84 %, worst -98 %' (and the exact note on a line of its own) for a panel title."""
    note = exact_note(e).strip().strip("()")
    return (f"median {fmt_pct(e.median())}, worst {fmt_pct(e[int(e.abs().arg_max())])}"
            + (f"\n{note}" if note else ""))


def _describe(errors: pl.DataFrame) -> str:
    """'24 measured jobs (fake), 2 models' for a figure title."""
    jobs = errors["job_id"].n_unique() if "job_id" in errors.columns else errors.height
    backends = (sorted(str(b) for b in errors["measure_backend"].drop_nulls().unique())
                if "measure_backend" in errors.columns else [])
    models = errors["model"].n_unique()
    return (f"{jobs} measured job{'s' * (jobs != 1)}" + (f" ({', '.join(backends)})" if backends else "")
            + f", {models} model{'s' * (models != 1)}")


def _formulas(errors: pl.DataFrame) -> list[str]:
    return errors["formula"].unique(maintain_order=True).to_list()


# ---- figures ----------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: Path) -> Path:
    try:
        return write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    finally:
        _plt().close(fig)


LEGEND_ENTRY_IN = 1.4   # width of one legend column (marker and a model name at 8 pt), inches


def _legend(fig: Figure, model_colours: dict[str, str], workload_markers: dict[str, str] | None) -> None:
    """Models by colour (and workloads by marker), below every panel, in as many columns as the
    figure's width holds. (To the right, its top sat beside the title and covered a title wider
    than the panels.)"""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=c, label=m) for m, c in model_colours.items()]
    if workload_markers:
        handles += [Line2D([], [], ls="", marker=mk, color="0.3", mfc="none", label=w)
                    for w, mk in workload_markers.items()]
    ncols = max(1, min(len(handles), int(fig.get_figwidth() / LEGEND_ENTRY_IN)))
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize=8,
               title="model" + (" / workload" if workload_markers else ""), title_fontsize=8, frameon=False)


def _title_width_in(title: str, fontsize: float) -> float:
    """Inches a figure needs for `title`'s longest line (DejaVu Sans averages about 0.6 em a character)."""
    return max(len(line) for line in title.splitlines()) * fontsize * 0.6 / 72 + 0.4


def _empty(ax, title: str) -> None:
    ax.set_title(title, fontsize=8)
    ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def predicted_vs_measured_figure(errors: pl.DataFrame) -> Figure:
    """Predicted vs measured GiB: one row of panels per formula, one column per workload, a colour
    per model; both axes one range (log when it spans a decade or more) with the y = x line."""
    plt = _plt()
    formulas, workloads = _formulas(errors), ordered_workloads(errors["workload"])
    cmap, mk = colours(errors["model"]), markers(workloads)
    title = (f"Predicted vs measured peak memory per workload: {_describe(errors)}\n"
             "one row per formula, one column per workload; dashed: predicted = measured")
    fig, axes = plt.subplots(len(formulas), len(workloads), squeeze=False, layout="constrained",
                             figsize=(max(3.1 * len(workloads), _title_width_in(title, 10)),
                                      3.0 * len(formulas) + 1.0))
    for i, f in enumerate(formulas):
        for j, w in enumerate(workloads):
            ax = axes[i][j]
            d = errors.filter(pl.col("formula") == f, pl.col("workload") == w)
            if not d.height:
                _empty(ax, f"{f} · {w}")
                continue
            x, y = d["measured_peak_bytes"] / GIB, d["total_bytes"] / GIB
            lo, hi, log = square_limits(pl.concat([x, y]))
            if log:
                from matplotlib.ticker import FuncFormatter

                plain = FuncFormatter(lambda v, _: f"{v:g}")   # 0.1, 1, 10 rather than 10^-1
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.xaxis.set_major_formatter(plain)
                ax.yaxis.set_major_formatter(plain)
            ax.plot([lo, hi], [lo, hi], ls="--", **GUIDE)
            for m in sorted(set(d["model"])):
                dm = d.filter(pl.col("model") == m)
                ax.scatter(dm["measured_peak_bytes"] / GIB, dm["total_bytes"] / GIB, s=22, alpha=0.8,
                           color=cmap[m], marker=mk[w], edgecolors="none", zorder=2)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_aspect("equal", adjustable="box")
            ax.tick_params(labelsize=7)
            e = d[ERROR]
            ax.set_title(f"{f} · {w}: {d.height} rows\n{_spread(e)}", fontsize=8)
            if i == len(formulas) - 1:
                ax.set_xlabel("measured GiB", fontsize=8)
            if j == 0:
                ax.set_ylabel("predicted GiB", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _legend(fig, cmap, None)
    return fig


def error_vs_seq_figure(errors: pl.DataFrame) -> Figure:
    """Signed error vs seq: one panel per formula, every row a point (colour: model, marker:
    workload), a line through each model x workload's median; error axes symmetric, per panel."""
    plt = _plt()
    formulas, workloads = _formulas(errors), ordered_workloads(errors["workload"])
    cmap, mk = colours(errors["model"]), markers(workloads)
    groups = [(m, w) for m in cmap for w in workloads
              if errors.filter(pl.col("model") == m, pl.col("workload") == w).height]
    # each model x workload a little to the side of the true seq (log2 units), so points don't hide
    step = min(0.05, 0.35 / max(len(groups) - 1, 1))
    dodge = {g: 2 ** ((k - (len(groups) - 1) / 2) * step) for k, g in enumerate(groups)}
    seqs = sorted(set(errors["seq"]))
    ncols = min(3, len(formulas))
    nrows = -(-len(formulas) // ncols)
    title = (f"Signed error vs sequence length: {_describe(errors)}\n"
             "error = (predicted − measured) / measured, y axes symmetric around 0 per formula\n"
             "one point per job; lines join each model × workload's median")
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(max(4.2 * ncols, _title_width_in(title, 10)), 3.3 * nrows + 1.2))
    for ax, f in zip(axes.ravel(), formulas):
        d = errors.filter(pl.col("formula") == f)
        for m, w in groups:
            g = d.filter(pl.col("model") == m, pl.col("workload") == w)
            if not g.height:
                continue
            med = g.group_by("seq").agg(pl.col(ERROR).median()).sort("seq")
            ax.plot(med["seq"] * dodge[m, w], med[ERROR], color=cmap[m], lw=1, alpha=0.7, zorder=2)
            ax.scatter(g["seq"] * dodge[m, w], g[ERROR], color=cmap[m], marker=mk[w], s=18,
                       alpha=0.85, edgecolors="none", zorder=3)
        ax.axhline(0, **GUIDE)
        lo, hi = error_limits(d[ERROR])
        wide = hi > SYMLOG_AXIS
        if wide:  # linear within ±20 %, logarithmic beyond: the spread near 0 stays readable
            ax.set_yscale("symlog", linthresh=SYMLOG_FROM)
        ax.set_ylim(lo, hi)
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.minorticks_off()
        ax.set_xlim(min(seqs) / 1.35, max(seqs) * 1.35)
        ax.grid(axis="y", color="0.9", lw=0.6)
        ax.tick_params(labelsize=7)
        e = d[ERROR]
        scale = f"; symmetric-log beyond ±{SYMLOG_FROM:g} %" if wide else ""
        ax.set_title(f"{f}: {d.height} rows{scale}\n{_spread(e)}", fontsize=8)
        ax.set_xlabel("seq (tokens)", fontsize=8)
        ax.set_ylabel("error %", fontsize=8)
    for ax in axes.ravel()[len(formulas):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    _legend(fig, cmap, mk)
    return fig


def residual_heatmap_figure(errors: pl.DataFrame, formula: str) -> Figure:
    """One formula's median signed error, model x seq, one panel per workload, on one colour
    scale symmetric around 0; every cell carries its value."""
    plt = _plt()
    d = errors.filter(pl.col("formula") == formula)
    workloads = ordered_workloads(d["workload"])
    models, seqs = sorted(set(d["model"])), sorted(set(d["seq"]))
    cells = d.group_by("workload", "model", "seq").agg(pl.col(ERROR).median(), pl.len().alias("n"))
    grids = {}
    for w in workloads:
        grid = np.full((len(models), len(seqs)), np.nan)
        for r in cells.filter(pl.col("workload") == w).iter_rows(named=True):
            grid[models.index(r["model"]), seqs.index(r["seq"])] = r[ERROR]
        grids[w] = grid
    lo, hi = error_limits(cells[ERROR])
    from matplotlib.colors import Normalize, SymLogNorm

    # one outlier (a tiny model's +2000 %) would bleach every other cell on a linear scale: past
    # ±SYMLOG_FROM % the colours go logarithmic beyond ±1 %, and each cell prints its value anyway
    log = hi > SYMLOG_FROM
    norm = SymLogNorm(linthresh=1.0, vmin=lo, vmax=hi, base=10) if log else Normalize(lo, hi)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad=(0, 0, 0, 0))   # no data: the hatched background
    width = 0.9 + 0.75 * len(seqs)
    fig, axes = plt.subplots(1, len(workloads), squeeze=False, layout="constrained",
                             figsize=(width * len(workloads) + 2.4, 1.5 + 0.42 * len(models)))
    im = None
    for ax, w in zip(axes[0], workloads):
        grid = grids[w]
        ax.patch.set_facecolor("white")
        ax.patch.set_hatch("///")
        ax.patch.set_edgecolor("0.8")
        im = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto")
        for (r, c), v in np.ndenumerate(grid):
            if not np.isnan(v):
                dark = abs(float(norm(v)) - 0.5) > 0.33
                ax.text(c, r, fmt_pct(v).replace(" %", ""), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
        ax.set_xticks(range(len(seqs)), [str(s) for s in seqs], fontsize=7)
        ax.set_yticks(range(len(models)), models if ax is axes[0][0] else [""] * len(models), fontsize=7)
        ax.set_xlabel("seq (tokens)", fontsize=8)
        n = d.filter(pl.col("workload") == w).height
        ax.set_title(f"{w}: {n} rows", fontsize=8)
    scale = f"±{hi:,.0f} %" if hi >= 10 else f"±{hi:.3g} %"
    fig.suptitle(f"{formula}: median signed error % per model × seq, one panel per workload\n"
                 f"{_describe(d)}; colour scale {scale}" + (", logarithmic beyond ±1 %" if log else "")
                 + f"{exact_note(d[ERROR])}; hatched: no measured row", fontsize=9)
    bar = fig.colorbar(im, ax=axes[0].tolist(), fraction=0.05, pad=0.02)
    bar.set_label("median error %", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if log:
        from matplotlib.ticker import FuncFormatter

        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+g}" if v else "0"))
    return fig


def predicted_vs_measured(errors: pl.DataFrame, path: Path) -> Path:
    """Write `predicted_vs_measured_figure` to `path` (atomically)."""
    return _save(predicted_vs_measured_figure(errors), path)


def error_vs_seq(errors: pl.DataFrame, path: Path) -> Path:
    """Write `error_vs_seq_figure` to `path` (atomically)."""
    return _save(error_vs_seq_figure(errors), path)


def residual_heatmap(errors: pl.DataFrame, formula: str, path: Path) -> Path:
    """Write `residual_heatmap_figure` for one formula to `path` (atomically)."""
    return _save(residual_heatmap_figure(errors, formula), path)
