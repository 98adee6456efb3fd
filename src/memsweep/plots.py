"""PNG figures for fit errors (matplotlib, imported lazily with the Agg backend: no screen)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from memsweep.fit import ERROR
from memsweep.results import write_atomic
from memsweep.units import GIB


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    try:
        return write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))
    finally:
        _plt().close(fig)


def predicted_vs_measured(errors: pl.DataFrame, path: Path) -> Path:
    """Log-log, one panel per formula, with the y = x line."""
    plt = _plt()
    formulas = errors["formula"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(formulas), figsize=(3.2 * len(formulas), 3.4), squeeze=False)
    for ax, f in zip(axes[0], formulas):
        d = errors.filter(pl.col("formula") == f)
        x, y = d["measured_peak_bytes"] / GIB, d["total_bytes"] / GIB
        lo, hi = max(min(x.min(), y.min()), 1e-4), max(x.max(), y.max())
        ax.loglog([lo, hi], [lo, hi], color="grey", lw=1)
        ax.scatter(x, y, s=6, alpha=0.6)
        ax.set_title(f, fontsize=9)
        ax.set_xlabel("measured GiB")
    axes[0][0].set_ylabel("predicted GiB")
    return _save(fig, path)


def error_vs_seq(errors: pl.DataFrame, path: Path) -> Path:
    """Median signed error per formula at each sequence length."""
    plt = _plt()
    med = errors.group_by("formula", "seq").agg(pl.col(ERROR).median()).sort("seq")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for f in errors["formula"].unique(maintain_order=True):
        d = med.filter(pl.col("formula") == f)
        ax.plot(d["seq"], d[ERROR], marker="o", label=f)
    ax.set_xscale("log", base=2)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xlabel("seq")
    ax.set_ylabel("median error %")
    ax.legend(fontsize=7)
    return _save(fig, path)


def residual_heatmap(errors: pl.DataFrame, formula: str, path: Path) -> Path:
    """Median signed error, model x seq, for one formula."""
    plt = _plt()
    d = (errors.filter(pl.col("formula") == formula).group_by("model", "seq")
         .agg(pl.col(ERROR).median()).sort("seq"))
    wide = d.pivot(on="seq", index="model", values=ERROR).sort("model")
    values = wide.drop("model").to_numpy()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * values.shape[1], 0.8 + 0.4 * values.shape[0]))
    lim = max(abs(float(pl.Series(values.ravel()).drop_nans().abs().max() or 1.0)), 1e-9)
    im = ax.imshow(values, cmap="coolwarm", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(values.shape[1]), wide.columns[1:])
    ax.set_yticks(range(values.shape[0]), wide["model"].to_list())
    ax.set_xlabel("seq")
    ax.set_title(f"{formula}: median error %", fontsize=9)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)
