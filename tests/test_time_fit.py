"""Step time against measurement (issue 15 part 4): the error tables, the refit of the time model's
constants, its held-out judgement, its YAML, and `time=` selecting it in a sweep and a plan.

"Measured" times are synthesized by the time model itself with known constants (compute 0.45,
memory 0.6 instead of 0.7, 0.8) on real JobSpecs, written into result rows as a cuda backend would;
the calibration must give those constants back. One check runs real measure=cpu rows through
scripts/fit.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import yaml
from conftest import REPO, job, workload

from memsweep.app import fit_cli
from memsweep.columns import Columns
from memsweep.errors import ConfigError
from memsweep.estimate import estimate_rows
from memsweep.formulas import get_formula
from memsweep.formulas.timing import (
    Speeds, TimeConstants, constants_option, dump_constants, load_constants, step_time,
)
from memsweep.results import RESULTS_NAME, frame
from memsweep.time_fit import (
    ESTIMATED, PHASES, calibrate_time, error_tables, held_out, parse_backends, time_data, time_errors, timed_jobs,
)

TRUTH = TimeConstants(compute_efficiency=0.45, memory_efficiency=0.6)
DEFAULT = TimeConstants()
INFERENCE = workload("inference", gen_tokens=32)


def grid() -> list:
    return [job(m, seq=seq, batch=batch, **({"wl": INFERENCE} if wl == "inference" else {}))
            for m in ("gpt2", "qwen2.5-0.5b", "llama3.2-1b", "llama3-8b")
            for seq in (256, 512) for batch in (1, 4) for wl in ("train", "inference")]


def timed_rows(specs, truth: TimeConstants = TRUTH, backend: str = "cuda") -> pl.DataFrame:
    """One result row per job (the detailed formula's), its measured_* times made by `truth`."""
    rows = []
    for i, spec in enumerate(specs):
        row = estimate_rows(spec, [get_formula("detailed")])[0]
        t = step_time(Columns.from_specs([spec]), Speeds.of([spec.hardware], [spec.dtype]), truth)
        train = spec.workload.training
        value = lambda x, scale=1.0: float(x[0]) * scale  # noqa: E731
        row.update(sweep_id="synthetic", job_id=f"job{i:03d}", job_num=i, measure_backend=backend,
                   step_time_s=value(t.step_s),
                   measured_forward_s=value(t.forward_s) if train else None,
                   measured_backward_s=value(t.backward_s) if train else None,
                   measured_optimizer_s=value(t.optimizer_s) if train else None,
                   measured_prefill_s=None if train else value(t.prefill_s),
                   measured_decode_token_s=None if train else value(t.decode_s, 1.0 / spec.gen_tokens))
        rows.append(row)
    return frame(rows)


@pytest.fixture(scope="module")
def table() -> pl.DataFrame:
    return timed_rows(grid())


@pytest.fixture(scope="module")
def calibration(table):
    data = time_data(timed_jobs(table))
    return data, calibrate_time(data)


def test_the_calibration_gives_back_the_constants_that_made_the_times(calibration):
    _, cal = calibration
    assert cal.constants.compute_efficiency == pytest.approx(0.45, rel=0.02)
    assert cal.constants.memory_efficiency == pytest.approx(0.6, rel=0.02)
    assert cal.mape_before_pct > 20 and cal.mape_after_pct < 0.1
    assert cal.jobs == 32 and cal.rows == 16 * 4 + 16 * 3  # train: step + 3 phases; inference: step + 2


def test_constants_one_gpu_cannot_inform_keep_their_defaults(calibration):
    _, cal = calibration
    assert cal.fitted == ("compute_efficiency", "memory_efficiency")
    assert cal.constants.comm_efficiency == DEFAULT.comm_efficiency
    assert cal.constants.dp_overlap == DEFAULT.dp_overlap


def test_the_held_out_error_drops(calibration):
    data, _ = calibration
    held = held_out(data)
    assert held["held_out"] == "leave-one-model-out"  # four models
    assert held["held_out_after_pct"] < 1.0 < 20.0 < held["held_out_before_pct"]


def test_multi_gpu_rows_identify_the_communication_constants():
    truth = TimeConstants(compute_efficiency=0.45, memory_efficiency=0.6, comm_efficiency=0.5)
    specs = [job("llama3-8b", seq=s, parallel=p) for s in (1024, 4096) for p in ("tp2", "tp8", "single")]
    specs += [job("llama3.2-1b", seq=512, wl=INFERENCE), job("gpt2", seq=256, wl=INFERENCE)]
    cal = calibrate_time(time_data(timed_jobs(timed_rows(specs, truth))))
    assert "comm_efficiency" in cal.fitted and "dp_overlap" not in cal.fitted  # no data parallelism here
    assert cal.constants.comm_efficiency == pytest.approx(0.5, rel=0.02)
    assert cal.constants.compute_efficiency == pytest.approx(0.45, rel=0.02)


def test_the_error_tables_have_every_phase(table):
    errors = time_errors(timed_jobs(table))
    assert set(errors["phase"]) == set(PHASES)
    assert errors.columns[:5] == ["job", "phase", "estimated_s", "measured_s", "error_pct"]
    np.testing.assert_allclose(errors["error_pct"],
                               100 * (errors["estimated_s"] - errors["measured_s"]) / errors["measured_s"])
    assert errors["error_pct"].max() < 0  # the defaults are faster than the truth everywhere
    tables = error_tables(errors)
    assert list(tables) == ["phase", "model", "workload", "hardware"]
    assert tables["phase"]["phase"].to_list() == list(PHASES)
    assert set(tables["model"]["model"]) == {"gpt2", "qwen2.5-0.5b", "llama3.2-1b", "llama3-8b"}
    for t in tables.values():
        assert {"count", "median_abs_pct", "mape_pct", "worst_abs_pct"} <= set(t.columns)
    # parts older than the time model (no est_* columns): estimated from the spec, built-in constants
    old = table.with_columns(pl.lit(None, pl.Float64).alias(c) for c in ESTIMATED.values())
    again = time_errors(timed_jobs(old))
    np.testing.assert_allclose(again.sort("job", "phase")["error_pct"], errors.sort("job", "phase")["error_pct"],
                               rtol=1e-9)


def test_rows_repeat_per_formula_but_count_once_and_cpu_joins_only_when_asked(table):
    doubled = pl.concat([table, table.with_columns(pl.lit("seed_naive").alias("formula"))])
    assert timed_jobs(doubled).height == 32
    cpu = table.with_columns(pl.lit("cpu").alias("measure_backend"))
    assert timed_jobs(cpu).height == 0 and timed_jobs(cpu, parse_backends("cpu")).height == 32
    assert parse_backends("cuda,cpu") == ("cuda", "cpu")
    with pytest.raises(ConfigError, match="--time-backend"):
        parse_backends("fake")


def test_the_yaml_round_trips_and_a_bad_one_names_the_key(tmp_path):
    path = tmp_path / "time_calibrated.yaml"
    path.write_text(dump_constants(TRUTH, {"fitted": ["compute_efficiency"]}, "# header\n"))
    assert load_constants(path) == TRUTH == constants_option(str(path))
    assert constants_option(None) == DEFAULT
    (tmp_path / "bare.yaml").write_text("compute_efficiency: 0.5\n")  # a bare mapping: the rest stay default
    assert load_constants(tmp_path / "bare.yaml") == TimeConstants(compute_efficiency=0.5)
    (tmp_path / "bad.yaml").write_text("time_constants: {memory_efficiency: 1.5}\n")
    for value in (str(tmp_path / "bad.yaml"), str(tmp_path / "none.yaml"), 3, "x.parquet"):
        with pytest.raises(ConfigError) as exc:
            constants_option(value)
        assert exc.value.key == "time" and "\n" not in str(exc.value)


def test_fit_reports_calibrates_and_a_sweep_selects_the_yaml(table, tmp_path, capsys):
    source = tmp_path / "timed.parquet"
    table.write_parquet(source)
    report = tmp_path / "report"
    assert fit_cli.main([str(source), "--calibrate", "--report", str(report)]) == 0
    summary = (report / "fit_summary.md").read_text()
    assert "## Step time\n" in summary and "### By phase" in summary and "### By hardware" in summary
    assert "No row has a measured peak" in summary  # memory: one line, no failure
    assert set(pl.read_parquet(report / "time_errors.parquet")["phase"]) == set(PHASES)
    doc = yaml.safe_load((report / "time_calibrated.yaml").read_text())
    prov = doc["provenance"]
    assert prov["fitted"] == ["compute_efficiency", "memory_efficiency"] and prov["jobs"] == 32
    assert prov["held_out_after_pct"] < prov["held_out_before_pct"] and prov["backends"] == ["cuda"]
    assert doc["time_constants"]["compute_efficiency"] == pytest.approx(0.45, rel=0.02)
    yaml_path = report / "time_calibrated.yaml"
    # no install: the path is the selection; --install says so in one line
    assert fit_cli.main(["--install", str(yaml_path), "--into", str(tmp_path / "conf")]) == 2
    assert "needs no install" in capsys.readouterr().err

    def sweep(*extra: str):
        return subprocess.run([sys.executable, str(REPO / "sweep.py"), "model=gpt2", "seq=128", *extra],
                              capture_output=True, text=True, timeout=120)

    plain = sweep(f"hydra.run.dir={tmp_path}/plain")
    chosen = sweep(f"time={yaml_path}", f"hydra.run.dir={tmp_path}/t")
    assert plain.returncode == 0 and chosen.returncode == 0, chosen.stderr
    est = {d: pl.read_parquet(tmp_path / d / RESULTS_NAME)["est_step_time_s"][0] for d in ("plain", "t")}
    spec = job("gpt2", seq=128)
    cols, speeds = Columns.from_specs([spec]), Speeds.of([spec.hardware], [spec.dtype])
    model = lambda k: step_time(cols, speeds, k).step_s[0]  # noqa: E731
    assert est["plain"] == pytest.approx(model(DEFAULT), rel=1e-9)
    assert est["t"] == pytest.approx(model(load_constants(yaml_path)), rel=1e-9) and est["t"] > est["plain"]

    # a bad path: one line, exit 2, before any job (the command line's precheck; in-process)
    from memsweep.app.sweep import run

    assert run(["model=gpt2", f"time={tmp_path}/nosuch.yaml", f"hydra.run.dir={tmp_path}/bad"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: time='{tmp_path}/nosuch.yaml': not allowed")
    assert not (tmp_path / "bad").exists()


def test_the_planner_takes_the_same_key(tmp_path):
    from memsweep.plan import PlanSpec, make_plan

    path = tmp_path / "time_calibrated.yaml"
    path.write_text(dump_constants(TRUTH))
    small = dict(models=("llama3.2-1b",), hardware=("h100-80g",), seqs=(2048,), workloads=("train",),
                 recompute=("none",))
    plain, chosen = make_plan(PlanSpec(**small)), make_plan(PlanSpec(**small, time=str(path)))
    rate = lambda p: p.table.filter(pl.col("question") == "max_batch")["est_tokens_per_s"][0]  # noqa: E731
    assert rate(chosen) < rate(plain)
    with pytest.raises(ConfigError) as exc:
        PlanSpec(**small, time=str(tmp_path / "nosuch.yaml"))
    assert exc.value.key == "time"


def test_without_timed_rows_the_report_says_so_in_one_line(table, tmp_path):
    peaks = table.with_columns(pl.lit("fake").alias("measure_backend"),
                               pl.col("total_bytes").alias("measured_peak_bytes"))
    source = tmp_path / "fake.parquet"
    # two models: --calibrate needs leave-one-model-out (one model's jobs are refused, nothing written)
    peaks.filter(pl.col("model").is_in(["gpt2", "qwen2.5-0.5b"])).write_parquet(source)
    report = tmp_path / "report"
    assert fit_cli.main([str(source), "--calibrate", "detailed", "--report", str(report)]) == 0
    section = (report / "fit_summary.md").read_text().split("## Step time\n", 1)[1].strip().splitlines()
    assert section[0] == "No rows timed by cuda (measure=cuda times every phase)."
    assert not (report / "time_errors.parquet").exists() and not (report / "time_calibrated.yaml").exists()
    # cpu-timed rows are left out unless asked for, and the line says how to take them
    cpu = table.with_columns(pl.lit("cpu").alias("measure_backend"))
    lines, jobs = fit_cli.time_report(cpu, ("cuda",), tmp_path)
    assert jobs.height == 0 and lines[2] == "No rows timed by cuda (32 timed by cpu: --time-backend cpu takes them)."


def test_real_cpu_rows_through_fit_py(tmp_path):
    pytest.importorskip("torch")
    from memsweep.formulas import FORMULAS
    from memsweep.measure.backends import measure
    from memsweep.presets import load_preset
    from memsweep.specs import MeasureSpec

    spec = job("tiny", seq=32, measure=MeasureSpec(**load_preset("measure", "cpu")))
    m = measure(spec)  # what a measure=cpu job puts on its rows
    assert m.status == "ok", m.error
    rows = [{**r, **m.row_fields(), "sweep_id": "cpu", "job_id": "tiny32"}
            for r in estimate_rows(spec, list(FORMULAS.values()))]
    source = tmp_path / "cpu.parquet"
    frame(rows).write_parquet(source)
    report = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "fit.py"), str(source), "--time-backend", "cpu",
                           "--report", str(report)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = (report / "fit_summary.md").read_text()
    assert "## Step time\n\n1 job timed by cpu, 4 phase rows" in summary and "### By phase" in summary
    assert pl.read_parquet(report / "time_errors.parquet")["phase"].to_list() == ["step", "forward", "backward",
                                                                                  "optimizer"]
