"""The fit report's figures: titles, error axes, colours, panels and atomic writes (no pixel tests).

Built on a small synthetic error table, so this file runs in a few seconds without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from conftest import REPO
from memsweep import plots
from memsweep.fit import ERROR, with_errors
from memsweep.units import GIB

pytest.importorskip("matplotlib")

MODELS = {"tiny": 0.02, "gpt2": 2.3, "llama2-7b": 60.0}   # measured GiB at seq 128: spans decades
FACTORS = {"exact": lambda i: 1.0, "seed_off": lambda i: 0.55 + 0.1 * (i % 7)}  # seed_off: -45 .. +5 %


def table(workloads=("train", "inference"), formulas=tuple(FACTORS), models=tuple(MODELS)) -> pl.DataFrame:
    rows, i = [], 0
    for m in models:
        for w in workloads:
            for seq in (128, 1024):
                measured = MODELS[m] * GIB * (1 + seq / 4096) * (0.3 if w == "inference" else 1.0)
                i += 1
                for f in formulas:
                    rows.append({"job_id": f"j{i}", "model": m, "workload": w, "seq": seq, "formula": f,
                                 "status": "ok", "measure_backend": "fake",
                                 "measured_peak_bytes": int(measured),
                                 "total_bytes": int(measured * FACTORS[f](i))})
    return with_errors(pl.DataFrame(rows))


@pytest.fixture(scope="module")
def errors() -> pl.DataFrame:
    return table()


@pytest.mark.parametrize("values", [[-45.0, 5.0], [3.0, 7.5], [-80.0, -60.0], [0.0002, -0.0001], [12.0]])
def test_error_limits_are_symmetric_cover_the_data_and_follow_its_spread(values):
    lo, hi = plots.error_limits(values)
    worst = max(abs(v) for v in values)
    assert lo == -hi
    assert hi >= worst * 1.1                          # every value inside, with room
    assert hi == max(worst * plots.ERROR_PAD, plots.ERROR_FLOOR_PCT)   # not wider than the spread needs


def test_error_limits_floor_for_exact_or_missing_values():
    assert plots.error_limits([0.0, 1e-5, -3e-5]) == (-1.0, 1.0)   # not a ±0.00003 % axis
    assert plots.error_limits([]) == (-1.0, 1.0)
    assert plots.error_limits([float("nan"), 40.0]) == (-46.0, 46.0)
    assert plots.exact_note([1e-4, -0.049]) != "" and plots.exact_note([1e-4, 0.06]) == ""


def test_square_limits_go_log_only_across_a_decade():
    lo, hi, log = plots.square_limits([2.0, 9.0])
    assert not log and lo < 2.0 and hi > 9.0
    lo, hi, log = plots.square_limits([0.05, 9.0])
    assert log and lo < 0.05 and hi > 9.0


def test_colours_are_stable_per_model_whatever_the_order():
    a = plots.colours(["qwen2.5-0.5b", "gpt2", "tiny", "gpt2"])
    b = plots.colours(["tiny", "qwen2.5-0.5b", "gpt2"])
    assert a == b and len(set(a.values())) == 3
    assert len(set(plots.colours(f"m{i}" for i in range(15)).values())) == 15   # tab20 past 10


def _legend_colours(fig) -> dict[str, str]:
    from matplotlib.colors import to_hex

    return {h.get_label(): to_hex(h.get_color()) for h in fig.legends[0].legend_handles
            if h.get_label() in MODELS}


def test_predicted_vs_measured_has_a_titled_square_panel_per_formula_and_workload(errors):
    fig = plots.predicted_vs_measured_figure(errors)
    try:
        assert len(fig.axes) == 2 * 2                     # formulas x workloads
        assert "12 measured jobs (fake), 3 models" in fig.get_suptitle()
        for ax in fig.axes:
            formula, workload = ax.get_title().split(":")[0].split(" · ")
            assert formula in FACTORS and workload in ("train", "inference") and "6 rows" in ax.get_title()
            assert ax.get_xlim() == ax.get_ylim()        # one range on both axes
            assert ax.get_xscale() == "log"               # 0.02 .. 60 GiB spans decades
            offsets = np.concatenate([c.get_offsets() for c in ax.collections])
            assert len(offsets) == 6
            assert ax.get_xlim()[0] < offsets.min() and offsets.max() < ax.get_xlim()[1]
            assert ("every error below" in ax.get_title()) == (formula == "exact")
        colours = _legend_colours(fig)
    finally:
        plots._plt().close(fig)
    assert colours == plots.colours(MODELS)


def test_predicted_vs_measured_is_linear_for_a_narrow_range():
    fig = plots.predicted_vs_measured_figure(table(workloads=("lora",), formulas=("seed_off",), models=("gpt2",)))
    try:
        (ax,) = fig.axes
        assert ax.get_xscale() == "linear" and ax.get_xlim() == ax.get_ylim()
    finally:
        plots._plt().close(fig)


def test_error_vs_seq_axes_are_symmetric_per_formula_and_models_keep_their_colour(errors):
    fig = plots.error_vs_seq_figure(errors)
    try:
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert len(visible) == len(FACTORS)
        for ax in visible:
            formula = ax.get_title().split(":")[0]
            e = errors.filter(pl.col("formula") == formula)[ERROR]
            lo, hi = ax.get_ylim()
            assert lo == -hi and hi >= e.abs().max()
            if formula == "exact":
                assert hi == plots.ERROR_FLOOR_PCT and "every error below 0.05 %" in ax.get_title()
            else:
                assert hi == pytest.approx(e.abs().max() * plots.ERROR_PAD)
        colours = _legend_colours(fig)
    finally:
        plots._plt().close(fig)
    assert colours == plots.colours(MODELS)    # the same as predicted_vs_measured's


@pytest.mark.parametrize("formula, half, log", [("exact", 1.0, False), ("seed_off", None, True)])
def test_residual_heatmap_has_one_panel_per_workload_on_one_symmetric_scale(errors, formula, half, log):
    from matplotlib.colors import SymLogNorm

    fig = plots.residual_heatmap_figure(errors, formula)
    try:
        panels = [ax for ax in fig.axes if ax.images]
        assert [ax.get_title().split(":")[0] for ax in panels] == ["train", "inference"]
        assert panels[0].images[0].get_array().shape == (len(MODELS), 2)   # model x seq
        clims = {ax.images[0].get_clim() for ax in panels}
        assert len(clims) == 1
        lo, hi = clims.pop()
        worst = max(abs(float(v)) for ax in panels for v in ax.images[0].get_array().compressed())
        assert lo == -hi and hi >= worst and hi == (half or worst * plots.ERROR_PAD)
        assert isinstance(panels[0].images[0].norm, SymLogNorm) == log   # -45 % beside 0: log colours
        assert ("every error below 0.05 %" in fig.get_suptitle()) == (formula == "exact")
    finally:
        plots._plt().close(fig)


def test_writing_is_atomic_and_closes_the_figure(tmp_path, monkeypatch):
    errors = table(workloads=("train",), formulas=("seed_off",))   # one panel: cheap to draw
    plt = plots._plt()
    path = tmp_path / "pvm.png"
    plots.predicted_vs_measured(errors, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.get_fignums()
    before = path.read_bytes()

    def broken(self, fh, **kw):
        fh.write(b"half a png")
        raise RuntimeError("disk trouble")

    monkeypatch.setattr(plt.Figure, "savefig", broken)
    with pytest.raises(RuntimeError):
        plots.error_vs_seq(errors, path)
    assert path.read_bytes() == before                     # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pvm.png"]   # no temp file left
    assert not plt.get_fignums()


def test_importing_the_plots_module_does_not_import_matplotlib():
    code = "import sys, memsweep.plots, memsweep.fit; sys.exit('matplotlib' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": ""}, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_formula_without_rows_in_a_workload_keeps_its_titled_panel():
    e = pl.concat([table(formulas=("exact",)), table(workloads=("train",), formulas=("seed_off",))])
    fig = plots.predicted_vs_measured_figure(e)
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert len(titles) == 4 and titles[3] == "seed_off · inference"
        assert [t.get_text() for t in fig.axes[3].texts] == ["no rows"]
    finally:
        plots._plt().close(fig)


def test_an_outlier_puts_the_error_axis_on_a_symmetric_log_scale(errors):
    wild = errors.with_columns(pl.when(pl.col("formula") == errors["formula"][0]).then(pl.col(ERROR) * 0 + 2425.0)
                               .otherwise(pl.col(ERROR)).alias(ERROR))
    fig = plots.error_vs_seq_figure(wild)
    scales = [ax.get_yscale() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    lo, hi = fig.axes[0].get_ylim()
    assert scales[0] == "symlog" and lo == -hi and hi > 2425 and "linear" in scales[1:]
