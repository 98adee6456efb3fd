"""Sweeps that survive: isolated measurement turns crashes into rows; a killed sweep resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
from conftest import REPO, job

from memsweep.results import PART_NAME, RESULTS_NAME
from memsweep.specs import MeasureSpec

torch = pytest.importorskip("torch")

from memsweep.measure.backends import FAULT_ENV, measure, measure_isolated  # noqa: E402


def isolated(**limits) -> MeasureSpec:
    return MeasureSpec("fake", "fake", isolate=True, **limits)


def test_isolated_measurement_equals_the_in_process_one():
    spec = job("tiny", seq=64, measure=isolated(timeout_s=120))
    a, b = measure_isolated(spec), measure(spec)
    assert a.status == b.status == "ok" and a.peak_bytes == b.peak_bytes and a.breakdown == b.breakdown


@pytest.mark.parametrize("fault,limits,status,message", [
    ("segfault", {"timeout_s": 120}, "error", "died (signal SIGSEGV)"),
    ("hang", {"timeout_s": 3}, "timeout", "no result within measure.timeout_s=3"),
    ("memory", {"timeout_s": 120, "max_rss_gib": 0.6}, "error", "exceeded measure.max_rss_gib=0.6"),
])
def test_a_misbehaving_child_becomes_a_result(monkeypatch, fault, limits, status, message):
    monkeypatch.setenv(FAULT_ENV, fault)
    m = measure_isolated(job("tiny", seq=64, measure=isolated(**limits)))
    assert m.status == status and message in m.error and m.peak_bytes is None


def test_a_crashing_job_in_a_sweep_is_a_row_and_the_rest_land(tmp_path):
    env = {**os.environ, FAULT_ENV: "segfault"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "sweep.py"), "-m", "model=tiny", "seq=64,128", "measure=fake",
         "measure.isolate=true", f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and "2 job(s) failed" in proc.stderr, proc.stderr  # table first, then status 1
    t = pl.read_parquet(tmp_path / RESULTS_NAME)
    assert set(t["status"]) == {"error"} and t["total_bytes"].null_count() == 0
    assert t["error"].str.contains("SIGSEGV").all()


def test_killed_sweep_resumes_with_every_job_exactly_once(tmp_path):
    args = [sys.executable, str(REPO / "sweep.py"), "-m", "model=tiny", "seq=64,128,256,512",
            "batch=1,2", "measure=cpu", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(tmp_path.glob(f"*/{PART_NAME}"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # half-way: no on_multirun_end, no results.parquet
    proc.wait()
    done = {p.parent.name: p.stat().st_mtime_ns for p in tmp_path.glob(f"*/{PART_NAME}")}
    assert 3 <= len(done) < 8 and not (tmp_path / RESULTS_NAME).exists()

    resumed = subprocess.run([*args, "resume=true"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("resume: rows exist, skipped") >= len(done) - 1
    t = pl.read_parquet(tmp_path / RESULTS_NAME)
    per_job = t.group_by("job_id").agg(pl.len(), pl.col("job_num").n_unique().alias("nums"))
    assert per_job.height == 8 and (per_job["nums"] == 1).all()
    assert t.group_by("job_id", "formula").len()["len"].max() == 1
    assert set(t["status"]) == {"ok"} and t["measured_peak_bytes"].null_count() == 0
    unchanged = sum(1 for d, mtime in done.items() if (tmp_path / d / PART_NAME).stat().st_mtime_ns == mtime)
    assert unchanged >= len(done) - 1  # (a part being written when killed may be redone)


def test_resume_reruns_failed_jobs(tmp_path):
    args = [sys.executable, str(REPO / "sweep.py"), "-m", "model=tiny", "seq=64,128", f"hydra.sweep.dir={tmp_path}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0
    (broken,) = [p for p in tmp_path.glob(f"*/{PART_NAME}") if 1 in pl.read_parquet(p)["job_num"]]  # any launcher's
    t = pl.read_parquet(broken)
    t.with_columns(status=pl.when(pl.col("job_num") == 1).then(pl.lit("error")).otherwise("status")).write_parquet(broken)
    again = subprocess.run([*args, "resume=true"], capture_output=True, text=True, timeout=300)
    assert again.stdout.count("resume: rows exist, skipped") == 1
    assert set(pl.read_parquet(tmp_path / RESULTS_NAME)["status"]) == {"ok"}
