"""Calibration recovers known constants, lowers held-out error, and round-trips through a sweep."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import yaml
from conftest import CONF, REPO, job

from memsweep.calibrate import CALIBRATABLE, calibrate, design, held_out, mape, nnls
from memsweep.columns import Columns
from memsweep.formulas import FORMULAS, get_formula
from memsweep.results import RESULTS_NAME


def grid(models=("tiny", "llama2-7b", "llama3-8b", "gpt2", "mistral-7b"), **top):
    specs = []
    for m in models:
        for seq in (256, 512, 768):
            for batch in (1, 4):
                for wl in ("train", "lora", "inference"):
                    for recompute in ("none", "full"):
                        if wl == "inference" and recompute == "full":
                            continue
                        specs.append(job(m, wl=wl, seq=seq, batch=batch, recompute=recompute,
                                         precision="pure", **top))
    return specs


def test_nnls_matches_known_solutions():
    rng = np.random.default_rng(0)
    A = rng.random((40, 4))
    x_true = np.array([1.5, 0.0, 3.0, 0.25])
    assert np.allclose(nnls(A, A @ x_true), x_true, atol=1e-8)
    # a least-squares solution with a negative entry is clamped to 0, the rest refitted
    b = A @ np.array([1.0, -2.0, 1.0, 1.0])
    x = nnls(A, b)
    assert (x >= 0).all() and x[1] == 0.0


@pytest.mark.parametrize("name", list(FORMULAS))
def test_every_formula_is_affine_in_its_calibratable_constants(name):
    formula, c = FORMULAS[name], Columns.from_specs(grid(models=("tiny", "llama3-8b")))
    offset, A, names = design(formula, c)
    assert names == CALIBRATABLE[name]
    theta = np.array([getattr(formula.constants, n) for n in names])
    np.testing.assert_allclose(offset + A @ theta, formula(c).total, rtol=1e-9)


def test_synthetic_measurements_give_back_their_constants():
    # rows "measured" with F3 constants 12, 20, 4, 3 instead of the paper's 10, 24, 5, 2
    truth = FORMULAS["seed_korthikanti"].with_constants(
        "truth", replicated_sbh=12.0, sharded_sbh=20.0, scores_as2b=4.0, checkpoint_sbh=3.0)
    specs = grid() + [job("llama2-70b", parallel=p, seq=s, precision="pure") for p in ("tp2", "tp8") for s in (512, 2048)]
    c = Columns.from_specs(specs)
    result = calibrate(FORMULAS["seed_korthikanti"], c, truth(c).total)
    for key, value in dict(replicated_sbh=12.0, sharded_sbh=20.0, scores_as2b=4.0, checkpoint_sbh=3.0).items():
        assert getattr(result.formula.constants, key) == pytest.approx(value, rel=1e-6)
    assert mape(result.formula, c, truth(c).total) < 1e-6


def test_uninformed_constants_keep_their_values():
    c = Columns.from_specs(grid())  # pure precision only: the mixed-precision bytes never matter
    measured = FORMULAS["seed_mixed"](c).total * 1.1
    result = calibrate(FORMULAS["seed_mixed"], c, measured)
    assert "weight_bytes_per_param" not in result.fitted
    assert result.formula.constants.weight_bytes_per_param == 6.0


def test_calibration_never_returns_something_worse():
    c = Columns.from_specs(grid(models=("tiny", "gpt2")))
    exact = FORMULAS["detailed"](c).total
    result = calibrate(FORMULAS["detailed"], c, exact)
    assert mape(result.formula, c, exact) <= mape(FORMULAS["detailed"], c, exact) + 1e-12


def test_calibrating_f3_on_fake_measurements_lowers_held_out_error(measured_sweep):
    from memsweep.fit import load_tables, measured_jobs

    jobs, c, measured = measured_jobs(load_tables([measured_sweep]))
    assert len(measured) == 12
    held = held_out(FORMULAS["seed_korthikanti"], c, measured, jobs["model"].to_list())
    assert held["lomo_after_pct"] < held["lomo_before_pct"]
    assert held["split_after_pct"] < held["split_before_pct"]


def test_fit_script_writes_tables_plots_and_a_yaml_that_a_sweep_selects(measured_sweep, tmp_path):
    name = "seed_korthikanti_calibrated_pytest"
    report = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fit.py"), str(measured_sweep), "--calibrate",
         "seed_korthikanti", "--out", str(tmp_path / "formulas"), "--report", str(report)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for f in ("fit_errors.parquet", "fit_summary.md", "predicted_vs_measured.png", "error_vs_seq.png",
              "residuals_detailed.png"):
        assert (report / f).stat().st_size > 0, f
    errors = pl.read_parquet(report / "fit_errors.parquet")
    assert set(errors["grouping"]) == {"overall", "model", "precision", "workload", "recompute", "seq_bucket"}
    assert set(errors["formula"]) == set(FORMULAS)
    doc = yaml.safe_load((tmp_path / "formulas" / "seed_korthikanti_calibrated.yaml").read_text())
    prov = doc["provenance"]
    assert doc["base"] == "seed_korthikanti" and prov["rows"] == 12 and prov["data"] == [str(measured_sweep)]
    assert prov["mape_after_pct"] < prov["mape_before_pct"] and "lomo_after_pct" in prov

    # the YAML, placed in conf/formula/, is selectable by name in a new sweep
    target = CONF / "formula" / f"{name}.yaml"
    doc["name"] = name
    target.write_text(yaml.safe_dump(doc))
    try:
        sweep_dir = tmp_path / "sweep"
        proc = subprocess.run(
            [sys.executable, str(REPO / "sweep.py"), "-m", "model=tiny", "seq=256,768", "precision=pure",
             f"formula={name}", f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        t = pl.read_parquet(sweep_dir / RESULTS_NAME)
        assert name in set(t["formula"]) and "seed_korthikanti" in set(t["formula"])
        calibrated = get_formula(name)
        rows = t.filter(pl.col("formula") == name).sort("seq")
        expected = [int(round(calibrated(Columns.from_specs([job("tiny", seq=s, precision="pure")])).total[0]))
                    for s in (256, 768)]
        assert rows["total_bytes"].to_list() == expected
    finally:
        target.unlink(missing_ok=True)
