"""Issue 14: one capacity (fits = total <= (memory - reserve) x (1 - margin), capacity.py's), and an
end-of-sweep summary that shows every job: one row per job, every swept key, every model, status."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import subprocess
import sys

import polars as pl
import pytest
from conftest import CONF, REPO, job

from memsweep import capacity
from memsweep.app.cli import check_overrides
from memsweep.errors import ConfigError
from memsweep.estimate import estimate_rows
from memsweep.formulas import FORMULAS
from memsweep.results import (
    RESULTS_NAME, SCHEMA, SUMMARY_COMPACT_ROWS, SUMMARY_ROWS, Collected, align, frame, job_table, summarize,
    swept_keys,
)
from memsweep.specs import Hardware
from memsweep.units import MIB

DETAILED = [FORMULAS["detailed"]]


def table_rows(text: str) -> list[dict[str, str]]:
    """The printed Markdown table as dicts (header -> cell)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


# --- one capacity: the planner's -------------------------------------------------------------

def test_fits_flips_at_the_capacity_capacity_py_computes():
    spec = job("tiny", seq=256)
    total = estimate_rows(spec, DETAILED)[0]["total_bytes"]
    for margin in (0.0, 0.05, 0.2):
        # a GPU whose capacity at this margin is the total, then one byte short of it
        usable = math.ceil(total / (1 - margin) / MIB) + 1
        hw = Hardware("x", memory_mib=usable + 512, reserved_mib=512)
        row = estimate_rows(dataclasses.replace(spec, hardware=hw, margin=margin), DETAILED)[0]
        cap = capacity.capacity_bytes(hw.memory_bytes, 512 * MIB, margin)
        assert row["capacity_bytes"] == math.floor(cap) and row["margin"] == margin
        assert row["fits"] is (total <= cap) and row["headroom_bytes"] == row["capacity_bytes"] - total
        # the same job at a margin that leaves one byte less than the total does not fit
        tight = 1 - (total - 1) / hw.usable_bytes
        short = estimate_rows(dataclasses.replace(spec, hardware=hw, margin=tight), DETAILED)[0]
        assert short["capacity_bytes"] < total and short["fits"] is False and short["headroom_bytes"] < 0


def test_a_total_inside_the_margin_no_longer_fits():
    """What split the sweep (no margin: fits) from the planner (5 %: does not) before issue 14."""
    spec = job("gpt2", seq=256)
    total = estimate_rows(spec, DETAILED)[0]["total_bytes"]
    hw = Hardware("x", memory_mib=math.ceil(total / 0.97 / MIB) + 512, reserved_mib=512)
    assert total < hw.usable_bytes
    row = estimate_rows(dataclasses.replace(spec, hardware=hw), DETAILED)[0]
    assert row["margin"] == capacity.DEFAULT_MARGIN and row["fits"] is False
    assert estimate_rows(dataclasses.replace(spec, hardware=hw, margin=0), DETAILED)[0]["fits"] is True


def test_margin_flows_from_the_config_into_the_spec_and_its_rows(compose_config):
    from memsweep.app.convert import to_job_spec

    default, tight = (to_job_spec(compose_config("model=tiny", *o)) for o in ([], ["margin=0.1"]))
    assert default.margin == capacity.DEFAULT_MARGIN and tight.margin == 0.1
    assert json.loads(estimate_rows(tight, DETAILED)[0]["spec_json"])["margin"] == 0.1


def test_command_line_margin_is_checked_before_any_job(tmp_path):
    check_overrides(["margin=0.1"], CONF)
    check_overrides(["-m", "margin=0,0.1"], CONF)
    with pytest.raises(ConfigError, match=r"^margin=1: not allowed; allowed: a number in \[0, 1\)"):
        check_overrides(["-m", "margin=0.1,1"], CONF)
    proc = subprocess.run([sys.executable, str(REPO / "sweep.py"), "margin=2", f"hydra.run.dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: margin=2: not allowed; allowed: a number in [0, 1), e.g. 0.05"
    assert not (tmp_path / "r").exists()


# --- the summary shows every job --------------------------------------------------------------

def test_a_sweep_of_nested_keys_and_two_models_prints_every_job(tmp_path):
    """model.layers=0 fails (an error job, named by its overrides); the rest are ok."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "sweep.py"), "-m", "model=gpt2,tiny", "model.layers=2,0",
         "optimizer.impl=foreach,fused", "seq=64", f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # jobs failed; their rows are in the table
    rows = table_rows(proc.stdout)
    assert len(rows) == 8 == pl.read_parquet(tmp_path / RESULTS_NAME)["job_id"].n_unique()
    assert {(r["model"], r["model.layers"], r["optimizer.impl"]) for r in rows} == {
        (m, n, i) for m in ("gpt2", "tiny") for n in ("2", "0") for i in ("foreach", "fused")}
    for r in rows:
        if r["model.layers"] == "0":
            assert r["status"] == "error" and r["detailed"] == r["fits"] == ""
        else:
            assert r["status"] == "ok" and float(r["detailed"]) > 0 and r["fits"] == "yes"
            assert float(r["headroom"]) > 0 and r["peak"]
    assert "capacity 75.19 GiB per GPU (h100-80g, margin 0.05)" in proc.stdout
    assert {r["job"] for r in rows} == {str(n) for n in range(8)}


def rows_of(specs, extra: dict[int, dict] | None = None) -> list[dict]:
    """Each spec's rows as a sweep job writes them; `extra` overrides a job's columns (a status)."""
    out = []
    for n, spec in enumerate(specs):
        out += [{**r, "job_num": n, "job_id": f"id{n}", "sweep_id": "s", **(extra or {}).get(n, {})}
                for r in estimate_rows(spec, list(FORMULAS.values()))]
    return out


def test_swept_keys_are_what_differs_and_a_name_explains_its_group():
    jobs = [{"model.name": m, "model.layers": n, "model.hidden": h, "seq": 64}
            for m, h in (("gpt2", 768), ("tiny", 64)) for n in (2, 4)]
    assert swept_keys(jobs) == ["model.name", "model.layers"]
    assert swept_keys([{"model.name": "gpt2", "model.layers": 12}, {"model.name": "tiny", "model.layers": 2}]) == [
        "model.name"]
    assert swept_keys([{"a": None}, {"a": 1}]) == ["a"] and swept_keys([{"a": 1}, {}]) == []


def test_every_status_is_a_row_and_old_parts_still_show():
    specs = [job("tiny", seq=s) for s in (64, 128, 256, 512)]
    rows = rows_of(specs, {1: {"status": "oom", "error": "CUDA out of memory"},
                           2: {"status": "skipped", "error": "measure.max_gib"}})
    t = frame(rows)
    old = t.filter(pl.col("job_num") == 3).drop(["headroom_bytes", "margin", "peak_phase", "optimizer_step_bytes"])
    t = pl.concat([t.filter(pl.col("job_num") != 3), align(old)])
    out = io.StringIO()
    summarize(Collected(table=t, path=None, parts=4), out=out)
    got = {r["seq"]: r for r in table_rows(out.getvalue())}
    assert [got[s]["status"] for s in ("64", "128", "256", "512")] == ["ok", "oom", "skipped", "ok"]
    assert got["512"]["headroom"] and got["512"]["fits"] == "yes"  # schema 5: capacity - total
    assert got["128"]["detailed"] and got["64"]["peak"] == "optimizer_step"  # an oom job keeps its estimate


def test_a_long_sweep_prints_a_compact_table_and_points_to_the_parquet(tmp_path):
    n = SUMMARY_ROWS + 5
    specs = [job(m, seq=32 + 16 * i) for i, m in zip(range(n), ["tiny", "gpt2"] * n)]
    rows = rows_of(specs, {7: {"status": "error", "error": "boom"}})
    t = frame(rows)
    out = io.StringIO()
    summarize(Collected(table=t, path=tmp_path / RESULTS_NAME, parts=n), out=out)
    shown = table_rows(out.getvalue())
    assert len(shown) == SUMMARY_COMPACT_ROWS
    assert f"{n} jobs: every row is in {tmp_path / RESULTS_NAME}" in out.getvalue()
    assert {r["model"] for r in shown} == {"tiny", "gpt2"} and "error" in {r["status"] for r in shown}
    assert len(job_table(t, limit=None).table) == n
    assert list(SCHEMA).index("overrides") < list(SCHEMA).index("est_step_time_s")  # appended after it
