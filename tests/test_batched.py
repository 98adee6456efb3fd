"""Issue 16: the batched launcher (`hydra/launcher=batched`): the basic launcher's table, faster.
Analytic jobs are estimated together and written one part per batch; measured jobs still run one
by one. Few jobs, model=tiny: about 25 s in all."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from conftest import REPO, job
from omegaconf import OmegaConf

from memsweep.app import batched
from memsweep.app.job import job_id
from memsweep.errors import ConfigError
from memsweep.estimate import estimate_many, estimate_rows
from memsweep.formulas import FORMULAS, Formula
from memsweep.results import BATCH_RECORD, PART_NAME, RESULTS_NAME
from memsweep.specs import LossSpec

BATCHED = ["hydra/launcher=batched"]


def sweep(out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "sweep.py"), "-m", *args, f"hydra.sweep.dir={out}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def table(out) -> pl.DataFrame:
    return pl.read_parquet(out / RESULTS_NAME).drop("sweep_id").sort("job_num", "formula")


# --- the same rows, estimated together ---------------------------------------------------------

def varied_specs() -> list:
    """Jobs across models, workloads, precisions, layouts and techniques; a few overflow."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(600):
        if len(out) == 40:
            break
        pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
        try:
            out.append(job(pick(["tiny", "gpt2", "llama3-8b", "mixtral-8x7b", "deepseek-v3", "gemma-2-2b", "bert-base-uncased"]),
                           wl=pick(["train", "inference", "lora", "qlora", "serve"]),
                           optimizer=pick(["adamw", "sgd", "adamw8bit", "adafactor"]),
                           parallel=pick(["single", "tp2", "zero3"]), hardware=pick(["h100-80g", "rtx3050-4g"]),
                           seq=pick([64, 2048, 32768, 2**31 - 1]), batch=pick([1, 4, 2**31 - 1]), dtype=pick(["fp32", "bf16", "int4"]),
                           recompute=pick(["none", "full"]), kv_dtype=pick(["auto", "fp8"]),
                           loss=LossSpec(chunks=pick([1, 8]))))
        except ConfigError:
            continue
    return out


def one_by_one(specs, formulas) -> list:
    out = []
    for s in specs:
        try:
            out.append(estimate_rows(s, formulas))
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    return out


def same(a: list, b: list) -> bool:
    def key(x):
        return (type(x).__name__, str(x)) if isinstance(x, Exception) else x
    return [key(x) for x in a] == [key(x) for x in b]


def test_estimating_together_gives_each_jobs_rows():
    specs = varied_specs()
    assert len(specs) == 40
    formulas = list(FORMULAS.values())
    expected = one_by_one(specs, formulas)
    assert any(isinstance(x, ConfigError) for x in expected) and any(isinstance(x, list) for x in expected)
    assert same(estimate_many(specs, formulas), expected)


def test_a_formula_that_fails_for_one_job_fails_for_that_job_only():
    naive = FORMULAS["seed_naive"]

    def fragile(c, k):
        if (c.seq == 128).any():
            raise ValueError("no 128")
        return naive.evaluate(c, k)

    formulas = [Formula("fragile", fragile, naive.constants, "test"), FORMULAS["detailed"]]
    specs = [job("tiny", seq=s) for s in (64, 128, 256)]
    rows = estimate_many(specs, formulas)
    assert same(rows, one_by_one(specs, formulas))
    assert [r[0]["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1][0]["error"] == "formula fragile: ValueError: no 128" and rows[1][1]["status"] == "ok"


@pytest.mark.parametrize("groups, values", [
    (["model=gpt2"], ["seq=512", "dtype=fp16", "batch=4"]),
    (["model=tiny", "workload=lora"], ["model.layers=3", "workload.lora_rank=4", "workload.lora_targets=[q,v]"]),
    (["model=tiny", "formula=detailed"], ["formulas=[detailed,seed_naive]", "formula.constants.overhead_bytes=1e9",
                                          "offload.optimizer=true", "margin=0.1", "time=null"]),
])
def test_value_overrides_on_plain_data_are_hydras(compose_config, groups, values):
    """A job's config from its group's composition and its values applied as plain data equals
    Hydra's composition of all of them: the same dict, the same job id."""
    full = OmegaConf.to_container(compose_config(*groups, *values), resolve=True)
    base = OmegaConf.to_container(compose_config(*groups), resolve=True)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(values):
        assert batched._apply(base, tuple(o.key_or_group.split(".")), o.value())
    assert base == full and job_id(base) == job_id(compose_config(*groups, *values))


def test_a_missing_key_or_a_mapping_is_left_to_hydra():
    cfg = {"seq": 1, "model": {"layers": 2}, "formulas": ["a"]}
    assert not batched._apply(cfg, ("nosuch",), 1)
    assert not batched._apply(cfg, ("model",), 3)  # a mapping replaced
    assert not batched._apply(cfg, ("formulas",), "all")  # a list made a value
    assert not batched._apply(cfg, ("seq", "x"), 1)
    assert cfg == {"seq": 1, "model": {"layers": 2}, "formulas": ["a"]}


# --- the command line ----------------------------------------------------------------------------

GRID = ["model=tiny", "batch=1,2", "seq=64,0,128", "workload=train,inference"]
"""Twelve jobs; 2, 3, 8 and 9 have seq=0 (error rows). Batches of 4: 0-3, 4-7, 8-11."""


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """One grid (with a bad value) through the basic launcher and the batched one."""
    root = tmp_path_factory.mktemp("both")
    basic = sweep(root / "basic", *GRID, "hydra/launcher=basic")
    fast = sweep(root / "batched", *GRID, *BATCHED, "hydra.launcher.batch_size=4")
    return root, basic, fast


def test_the_batched_table_equals_the_basic_launchers(both):
    root, basic, fast = both
    assert basic.returncode == fast.returncode == 1, fast.stderr
    assert table(root / "batched").equals(table(root / "basic"))  # job ids and numbers too
    assert sorted(p.parent.name for p in (root / "batched").glob(f"*/{PART_NAME}")) == [
        "batch-0-3", "batch-4-7", "batch-8-11"]


def test_a_bad_value_is_an_error_row_and_the_rest_land(both):
    root, _, fast = both
    t = table(root / "batched")
    bad = t.filter(pl.col("status") == "error")
    assert bad.height == 4 and set(bad["seq"]) == {0}
    assert all(e.startswith("seq=0: not allowed; allowed: an integer >= 1") for e in bad["error"])
    assert t.filter(pl.col("status") == "ok").height == 8 * len(FORMULAS)
    assert fast.stderr.splitlines()[-1] == "error: 4 job(s) failed (status=error); their rows are in the table"
    assert "error: job 2: seq=0: not allowed" in fast.stderr and "Traceback" not in fast.stderr
    assert "job/s" not in fast.stderr  # no progress bar when stderr is not a terminal


def test_the_compact_hydra_record(both):
    root, _, _ = both
    t = table(root / "batched")
    lines = [json.loads(line) for d in sorted((root / "batched").glob("batch-*"))
             for line in (d / BATCH_RECORD).read_text().splitlines()]
    assert [x["job_num"] for x in lines] == list(range(12))
    ids = dict(zip(t["job_num"], t["job_id"]))
    for x in lines:
        assert ids[x["job_num"]] == x["job_id"] == job_id(x["config"])
        given = dict(o.split("=") for o in x["overrides"])
        assert x["config"]["seq"] == int(given["seq"]) and x["config"]["batch"] == int(given["batch"])
        assert t.filter(pl.col("job_num") == x["job_num"])["overrides"][0] == json.dumps(sorted(x["overrides"]))


def test_resume_after_a_lost_batch_runs_only_its_jobs(both, tmp_path):
    root, _, _ = both
    d = tmp_path / "s"
    shutil.copytree(root / "batched", d)
    (d / RESULTS_NAME).unlink()
    (d / "batch-4-7" / PART_NAME).unlink()  # killed while estimating this batch: its record, no part
    collected = subprocess.run([sys.executable, str(REPO / "scripts" / "collect.py"), str(d)],
                               capture_output=True, text=True, timeout=120)
    assert collected.returncode == 0 and "jobs without rows (interrupted?): 4" in collected.stdout
    again = sweep(d, *GRID, *BATCHED, "hydra.launcher.batch_size=4", "resume=true", "hydra.launcher.progress=true")
    assert again.returncode == 1, again.stderr  # the failed jobs ran again, and failed again
    skipped = {int(line.split("]")[0].split()[1]) for line in again.stdout.splitlines() if "rows exist, skipped" in line}
    assert skipped == {0, 1, 10, 11}  # the ok jobs outside the lost batch; 4-7 and the failed 2, 3, 8, 9 ran
    assert "12/12" in again.stderr  # the progress bar, asked for
    assert table(d).equals(table(root / "batched"))  # every job once: re-run jobs replaced their rows in place
    for name, nums in (("batch-0-3", [0, 1, 2, 3]), ("batch-4-7", [4, 5, 6, 7]), ("batch-8-11", [8, 9, 10, 11])):
        assert pl.read_parquet(d / name / PART_NAME)["job_num"].unique().sort().to_list() == nums


def test_collect_script_over_a_batched_sweep(both, tmp_path):
    root, _, _ = both
    d = tmp_path / "s"
    shutil.copytree(root / "batched", d)
    (d / RESULTS_NAME).unlink()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "collect.py"), str(d)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "jobs without rows" not in proc.stdout and f"rows: {table(root / 'batched').height} " in proc.stdout
    assert table(d).equals(table(root / "batched"))


def test_measured_jobs_in_a_batched_sweep_run_one_by_one(tmp_path):
    pytest.importorskip("torch")
    proc = sweep(tmp_path, "model=tiny", "seq=64", "measure=none,fake", "formulas=[detailed]", *BATCHED)
    assert proc.returncode == 0, proc.stderr
    assert "[job 1] measure=fake" in proc.stdout and "[job 0] measure" not in proc.stdout
    assert (tmp_path / "1" / ".hydra" / "config.yaml").is_file() and (tmp_path / "1" / PART_NAME).is_file()
    assert (tmp_path / "batch-0-1" / PART_NAME).is_file() and not (tmp_path / "0").exists()
    t = table(tmp_path)
    assert t["measure_backend"].to_list() == [None, "fake"] and t["measured_peak_bytes"].null_count() == 1
    # resumed by the basic launcher: the batched job's rows are found in its batch (no second copy)
    again = sweep(tmp_path, "model=tiny", "seq=64", "measure=none,fake", "formulas=[detailed]", "resume=true",
                  "hydra/launcher=basic")
    assert again.returncode == 0 and again.stdout.count("resume: rows exist, skipped") == 2, again.stdout
    assert table(tmp_path).equals(t) and "jobs without rows" not in again.stdout


def test_prepare_is_both_launchers_step_and_builds_shared_parts_once(compose_config):
    """`job.prepare` is what run_job and the batched launcher both do to a configuration: the
    same spec from a compose_config config and from its plain data, the formulas and time constants
    built once per distinct key, and a failing key failing each of its jobs alike."""
    from memsweep.app import job as job_mod

    cache: dict = {}
    plain = OmegaConf.to_container(compose_config("model=tiny", "seq=64"), resolve=True)
    a = job_mod.prepare(plain, cache)
    b = job_mod.prepare(compose_config("model=tiny", "seq=128"), cache)
    assert a.formulas is b.formulas and a.time is b.time
    assert a.spec == job_mod.prepare(compose_config("model=tiny", "seq=64")).spec and b.spec.seq == 128
    bad = [OmegaConf.to_container(compose_config("model=tiny", f"seq={s}", "time=/no/such/time.yaml"), resolve=True)
           for s in (64, 128)]
    failures = []
    for cfg in bad:
        with pytest.raises(ConfigError) as err:
            job_mod.prepare(cfg, cache)
        failures.append(job_mod.failure(err.value))
    assert failures[0] == failures[1] and failures[0][0] == 2 and "time='/no/such/time.yaml'" in failures[0][1]
    with pytest.raises(ConfigError, match="resume='maybe'"):
        job_mod.prepare({**plain, "resume": "maybe"})
    assert job_mod.failure(ValueError("no\nmore")) == (1, "ValueError: no")
