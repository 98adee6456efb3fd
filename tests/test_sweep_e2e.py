"""The real command line: Hydra multirun in a subprocess, `results.parquet` read back and checked."""

from __future__ import annotations

import subprocess
import sys

import polars as pl
import pytest
from conftest import REPO, job
from test_results import CONTRACT

from memsweep.estimate import estimate_rows
from memsweep.formulas import FORMULAS
from memsweep.results import PART_NAME, RESULTS_NAME


def sweep(*args: str, cwd=REPO, extra_env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(extra_env or []), str(REPO / "sweep.py"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def used_by(tmp_path_factory):
    """The used-by command, verbatim but for the output directory."""
    out = tmp_path_factory.mktemp("sweep")
    proc = sweep("-m", "seq=512,2048,8192", "dtype=fp16,bf16", f"hydra.sweep.dir={out}")
    return proc, out


def test_used_by_command_writes_one_table(used_by):
    proc, out = used_by
    assert proc.returncode == 0, proc.stderr
    t = pl.read_parquet(out / RESULTS_NAME)
    assert t.columns[: len(CONTRACT)] == CONTRACT
    assert t.height == 6 * len(FORMULAS)
    assert t.group_by(["job_id", "formula"]).len()["len"].max() == 1
    assert set(t["status"]) == {"ok"} and set(t["model"]) == {"llama2-7b"}
    assert sorted(set(zip(t["seq"], t["dtype"]))) == sorted(
        (s, d) for s in (512, 2048, 8192) for d in ("bf16", "fp16"))
    assert t["sweep_id"].n_unique() == 1 and t["job_id"].n_unique() == 6


def test_printed_summary_has_path_count_and_pivot(used_by):
    proc, out = used_by
    assert f"results: {out / RESULTS_NAME}" in proc.stdout
    assert f"rows: {6 * len(FORMULAS)} " in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| seq"))
    assert all(f in header for f in FORMULAS) and "dtype" in header


def test_rows_equal_the_in_process_estimate(used_by):
    _, out = used_by
    t = pl.read_parquet(out / RESULTS_NAME).filter((pl.col("seq") == 8192) & (pl.col("dtype") == "fp16"))
    expected = {r["formula"]: r["total_bytes"] for r in estimate_rows(
        job("llama2-7b", seq=8192, dtype="fp16"), list(FORMULAS.values()))}
    assert dict(zip(t["formula"], t["total_bytes"])) == expected


def test_a_bad_job_becomes_an_error_row_and_the_rest_land(tmp_path):
    proc = sweep("-m", "model=tiny", "seq=64,0", "batch=1,2", f"hydra.sweep.dir={tmp_path}")
    # the table is written, then the exit status says jobs failed (issue 11, case 10)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == "error: 2 job(s) failed (status=error); their rows are in the table"
    t = pl.read_parquet(tmp_path / RESULTS_NAME)
    bad = t.filter(pl.col("status") == "error")
    assert bad.height == 2 and set(bad["seq"]) == {0} and bad["formula"].null_count() == 2
    assert all(e.startswith("seq=0: not allowed; allowed: an integer >= 1") for e in bad["error"])
    assert t.filter(pl.col("status") == "ok").height == 2 * len(FORMULAS)
    assert "Traceback" not in proc.stderr


def test_single_run_bad_value_is_one_line_exit_2_and_still_a_row(tmp_path):
    proc = sweep("dtype=fp12", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: dtype='fp12': not allowed; allowed: fp32, fp16, bf16, int8, int4"]
    assert "Traceback" not in proc.stderr
    t = pl.read_parquet(tmp_path / RESULTS_NAME)
    assert t["status"].to_list() == ["error"] and t["dtype"].to_list() == ["fp12"]


@pytest.mark.parametrize("args", [["model=nosuch"], ["-m", "model=tiny,nosuch"], ["model.hiden=3"]])
def test_unknown_preset_or_key_fails_before_any_job(tmp_path, args):
    proc = sweep(*args, f"hydra.sweep.dir={tmp_path / 's'}", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: model")
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_single_run_needs_no_torch(tmp_path):
    proc = sweep("model=tiny", "seq=64", f"hydra.run.dir={tmp_path}", extra_env=["-X", "importtime"])
    assert proc.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line}
    assert "hydra" in imported and not any(m == "torch" or m.startswith("torch.") for m in imported)
    assert pl.read_parquet(tmp_path / RESULTS_NAME).height == len(FORMULAS)


def test_collect_script_recovers_an_interrupted_sweep(tmp_path):
    """A part per job (the basic launcher's; a lost batch of the batched one: tests/test_batched.py)."""
    copy = tmp_path / "interrupted"
    assert sweep("-m", "model=tiny", "seq=64,128,256", "hydra/launcher=basic", f"hydra.sweep.dir={copy}").returncode == 0
    (copy / RESULTS_NAME).unlink()
    (copy / "1" / PART_NAME).unlink()  # job 1 never finished
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "collect.py"), str(copy)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "jobs without rows (interrupted?): 1" in proc.stdout
    t = pl.read_parquet(copy / RESULTS_NAME)
    assert t.height == 2 * len(FORMULAS) and 1 not in set(t["job_num"])


def test_collect_script_rejects_a_missing_directory(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "collect.py"), str(tmp_path / "no")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: DIR=")
