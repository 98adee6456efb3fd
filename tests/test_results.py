"""One schema, atomic parts, and collection that survives interrupted and corrupt sweeps."""

from __future__ import annotations

import polars as pl
import pytest
from conftest import job

from memsweep.estimate import estimate_rows
from memsweep.formulas import FORMULAS, TERMS
from memsweep.results import (
    PART_NAME, RESULTS_NAME, SCHEMA, NotASweep, collect, coerce_row, frame, write_part,
)

CONTRACT = (
    "sweep_id job_id model family params seq batch dtype precision workload optimizer recompute "
    "attention tp pp dp zero hardware hardware_bytes formula weights_bytes gradients_bytes "
    "optimizer_bytes activations_bytes logits_bytes kv_cache_bytes overhead_bytes total_bytes fits "
    "status error measure_backend measured_peak_bytes measured_reserved_bytes step_time_s"
).split()


def rows_for(job_num: int, **top) -> list[dict]:
    rows = estimate_rows(job(**top), list(FORMULAS.values()))
    return [{**r, "job_num": job_num, "job_id": f"id{job_num}", "sweep_id": "s"} for r in rows]


def test_contract_columns_lead_the_schema_in_order():
    assert list(SCHEMA)[: len(CONTRACT)] == CONTRACT


def test_rows_of_a_job_fill_the_contract():
    df = frame(rows_for(0))
    assert df.height == len(FORMULAS) and df["status"].to_list() == ["ok"] * len(FORMULAS)
    # every term's column, the contract's and optimizer_step_bytes (schema 6), sums to the total
    terms = [f"{t}_bytes" for t in TERMS]
    assert set(terms) - {"optimizer_step_bytes"} == {
        c for c in CONTRACT if c.endswith("_bytes") and not c.startswith(("measured", "hardware", "total"))}
    assert (df.select(pl.sum_horizontal(terms)).to_series() == df["total_bytes"]).all()
    # llama2-7b at seq 2048 peaks at the foreach AdamW step: its temporaries are their own column
    detailed = df.filter(pl.col("formula") == "detailed").row(0, named=True)
    assert detailed["peak_phase"] == "optimizer_step" and detailed["optimizer_step_bytes"] > 0
    assert df["measured_peak_bytes"].null_count() == df.height


def test_error_row_values_of_the_wrong_type_become_null():
    row = coerce_row({"seq": "abc", "batch": True, "model": "x", "status": "error", "error": "seq='abc': ..."})
    assert row["seq"] is None and row["batch"] is None and row["model"] == "x"
    assert frame([row]).height == 1


def test_part_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = write_part(rows_for(0), tmp_path / "0")
    assert path.name == PART_NAME
    assert sorted(p.name for p in path.parent.iterdir()) == [PART_NAME]


def test_failed_write_keeps_the_previous_part(tmp_path, monkeypatch):
    write_part(rows_for(0), tmp_path)
    before = pl.read_parquet(tmp_path / PART_NAME)

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", boom)
    with pytest.raises(OSError):
        write_part(rows_for(0, seq=4096), tmp_path)
    assert pl.read_parquet(tmp_path / PART_NAME).equals(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PART_NAME]


def test_collect_skips_corrupt_and_temp_parts_and_reports_missing_jobs(tmp_path):
    for n in range(3):
        (tmp_path / str(n) / ".hydra").mkdir(parents=True)
    write_part(rows_for(0), tmp_path / "0")
    (tmp_path / "1" / PART_NAME).write_bytes(b"PAR1 not really parquet")
    (tmp_path / "2" / f".{PART_NAME}.abc.tmp").write_bytes(b"half written")
    got = collect(tmp_path)
    assert got.table.height == len(FORMULAS)
    assert [p.parent.name for p, _ in got.skipped] == ["1"]
    assert [d.name for d in got.jobs_without_rows] == ["1", "2"]
    assert pl.read_parquet(tmp_path / RESULTS_NAME).equals(got.table)


def test_collect_reads_parts_with_fewer_columns_as_nulls(tmp_path):
    write_part(rows_for(0), tmp_path / "0")
    old = frame(rows_for(1, seq=512)).drop(["total_gib", "schema_version", "step_time_s"])
    (tmp_path / "1").mkdir()
    old.write_parquet(tmp_path / "1" / PART_NAME)
    t = collect(tmp_path).table
    assert t.height == 2 * len(FORMULAS) and list(t.columns) == list(SCHEMA)
    assert t.filter(pl.col("job_num") == 1)["total_gib"].null_count() == len(FORMULAS)


def test_collect_of_a_sweep_without_parts_gives_an_empty_table_and_of_an_empty_folder_nothing(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "multirun.yaml").write_text("hydra: {}\n")  # what Hydra leaves first
    got = collect(tmp_path / "sweep")
    assert got.table.height == 0 and list(got.table.columns) == list(SCHEMA)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotASweep):
        collect(tmp_path / "empty")
    assert not list((tmp_path / "empty").iterdir())


def test_collect_refuses_a_part_whose_types_conflict(tmp_path):
    write_part(rows_for(0), tmp_path / "0")
    bad = frame(rows_for(1)).with_columns(pl.col("seq").cast(pl.String) + "tok")
    (tmp_path / "1").mkdir()
    bad.write_parquet(tmp_path / "1" / PART_NAME)
    got = collect(tmp_path)
    assert got.table.height == len(FORMULAS)
    [(part, why)] = got.skipped
    assert part.parent.name == "1" and why == "type conflict: column 'seq' is String, the schema says Int64"


def test_collect_accepts_narrower_numeric_types(tmp_path):
    old = frame(rows_for(0)).with_columns(pl.col("seq").cast(pl.Int32), pl.col("total_gib").cast(pl.Float32))
    (tmp_path / "0").mkdir()
    old.write_parquet(tmp_path / "0" / PART_NAME)
    got = collect(tmp_path)
    assert not got.skipped and got.table.schema["seq"] == pl.Int64()


def test_truncated_part_is_reported_with_its_path(tmp_path):
    write_part(rows_for(0), tmp_path / "0")
    data = (tmp_path / "0" / PART_NAME).read_bytes()
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / PART_NAME).write_bytes(data[: len(data) // 2])
    got = collect(tmp_path)
    assert [p.parent.name for p, _ in got.skipped] == ["1"] and got.skipped[0][1].startswith("unreadable: ")
