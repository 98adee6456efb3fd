"""Issue 27: bad input to collect, fit --calibrate, fit --install and plan ends in one `error:` line
(exit 2) or a correct result, and no user file is ever deleted. One test (or more) per case of
the issue; each failed before its fix. No subprocess, no sweep: folders are built by hand the way
a sweep leaves them (multirun.yaml, grids.json, <job num>/.hydra/, batch-<first>-<last>/)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import polars as pl
import pytest
from conftest import job

from memsweep import results
from memsweep.app import collect_cli, fit_cli, plan_cli
from memsweep.columns import Columns
from memsweep.estimate import estimate_rows
from memsweep.formulas import FORMULAS, get_formula
from memsweep.formulas.timing import Speeds, TimeConstants, step_time

HOURS_AGO = 2 * 3600  # older than results.STALE_AFTER_S, set with os.utime: no waiting, no clock race
DEAD_PID = 999_999_999  # above any pid_max: no process has it


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def part_rows(sweep_id: str, num: int, model: str = "tiny", seq: int = 64, measured: bool = False) -> pl.DataFrame:
    """One job's rows as a sweep writes them (every formula's), optionally fake-measured."""
    spec = job(model, seq=seq)
    rows = estimate_rows(spec, list(FORMULAS.values()))
    peak = int(FORMULAS["detailed"](Columns.from_specs([spec])).total[0] * 1.1)
    extra = {"measure_backend": "fake", "measured_peak_bytes": peak} if measured else {}
    return results.frame([{**r, **extra, "sweep_id": sweep_id, "job_id": f"{sweep_id}-{num}", "job_num": num}
                          for r in rows])


def sweep_dir(path: Path, jobs: int = 2, sweep_id: str | None = None) -> Path:
    """What a finished basic-launcher sweep leaves: multirun.yaml, grids.json, <num>/.hydra/ + part."""
    path.mkdir(parents=True)
    (path / "multirun.yaml").write_text("hydra: {}\n")
    (path / "grids.json").write_text('{"grids": [{"overrides": [], "subdir": ""}]}')
    for n in range(jobs):
        (path / str(n) / ".hydra").mkdir(parents=True)
        rows = part_rows(sweep_id or path.name, n, seq=64 * (n + 1))
        results.write_parquet_atomic(rows, path / str(n) / results.PART_NAME)
    return path


def aged(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    old = path.stat().st_mtime - HOURS_AGO
    os.utime(path, (old, old))
    return path


# --- 1. collect deletes only memsweep's temp files, where memsweep writes them ---------------------

def test_stale_temp_cleaning_leaves_every_file_memsweep_did_not_write(tmp_path):
    s = sweep_dir(tmp_path / "s")
    host = results._HOST
    dead = f"~{host}~{DEAD_PID}~abcd1234.tmp"
    ours = [  # memsweep's temps of its own files, where it writes them: removed
        s / "0" / f".{results.PART_NAME}{dead}",
        aged(s / f".{results.RESULTS_NAME}~otherhost~12~abcd1234.tmp"),  # another host's, old
        s / "batch-0-1" / ".hydra" / f".jobs.jsonl{dead}",
        s / "grid-0123abcd" / "3" / f".{results.PART_NAME}{dead}",  # an added grid's job
    ]
    for p in ours[:1] + ours[2:]:  # (touch would make the aged one new)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    users = [  # all old enough to pass for a killed write; none is provably memsweep's: kept
        aged(s / "notes" / ".draft.tmp"),  # the lost file
        aged(s / "notes" / f".{results.PART_NAME}{dead}"),  # memsweep's name, but not a job directory
        aged(s / "0" / f".{results.PART_NAME}.abc.tmp"),  # unnamed: an older memsweep's, or not
        aged(s / "0" / f".notes.txt{dead}"),  # memsweep's pattern, not a file memsweep writes
        aged(s / "0" / "deep" / f".{results.PART_NAME}{dead}"),  # below a job directory
        aged(s / "1" / f".{results.PART_NAME}~{host}~{os.getpid()}~abcd1234.tmp"),  # a write in flight
    ]
    got = results.collect(s)
    assert got.cleaned == len(ours) and not any(p.exists() for p in ours)
    assert all(p.is_file() for p in users)
    assert got.table.height == 2 * len(FORMULAS)


# --- 2. collect takes a sweep (or run) directory, one sweep, memsweep's parts ----------------------

def test_a_folder_without_sweep_markers_is_refused_without_being_walked(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    sweep_dir(home / "work" / "old" / "outputs" / "s")  # a sweep deep below: not what was asked for
    aged(home / "notes" / "todo.txt")

    def no_walk(*a, **k):
        raise AssertionError("walked a folder that is not a sweep")

    monkeypatch.setattr(Path, "rglob", no_walk)
    monkeypatch.setattr(os, "walk", no_walk)
    assert collect_cli.main([str(home)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: DIR={str(home)!r}: not a sweep or run directory") and "; allowed: " in line
    assert not (home / results.RESULTS_NAME).exists()
    with pytest.raises(results.NotASweep):
        results.collect(home)
    assert results.sweep_markers(home) == {}


def test_an_empty_folder_is_exit_2_and_nothing_written(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert collect_cli.main([str(empty)]) == 2
    assert "not a sweep or run directory" in one_error_line(capsys)
    assert list(empty.iterdir()) == []


def test_a_run_sweep_or_batched_sweep_directory_is_recognised(tmp_path, capsys):
    batched = tmp_path / "b"
    (batched / "batch-0-1" / ".hydra").mkdir(parents=True)
    (batched / "multirun.yaml").write_text("hydra: {}\n")
    both = pl.concat([part_rows("b", 0), part_rows("b", 1)])
    results.write_parquet_atomic(both, batched / "batch-0-1" / results.PART_NAME)
    run = tmp_path / "r"
    (run / ".hydra").mkdir(parents=True)
    results.write_parquet_atomic(part_rows("r", 0), run / results.PART_NAME)
    assert collect_cli.main([str(batched), str(run)]) == 0
    assert pl.read_parquet(batched / results.RESULTS_NAME).height == 2 * len(FORMULAS)
    assert pl.read_parquet(run / results.RESULTS_NAME).height == len(FORMULAS)
    assert results.sweep_markers(batched) == {"": ["multirun.yaml"]}
    assert results.sweep_markers(run) == {"": [".hydra/"]}


def test_a_folder_of_several_sweeps_is_merged_only_with_merge(tmp_path, capsys):
    parent = tmp_path / "multirun"
    sweep_dir(parent / "2026-01-01_10-00-00")
    sweep_dir(parent / "2026-01-02_10-00-00")
    assert collect_cli.main([str(parent)]) == 2
    line = one_error_line(capsys)
    assert "holds 2 sweep or run directories" in line and "--merge" in line
    assert not list(parent.rglob(results.RESULTS_NAME))
    assert collect_cli.main(["--merge", str(parent)]) == 0
    assert set(pl.read_parquet(parent / results.RESULTS_NAME)["sweep_id"]) == {"2026-01-01_10-00-00",
                                                                                "2026-01-02_10-00-00"}


def test_rows_of_several_sweep_ids_are_refused_by_the_command_and_merged_at_the_end_of_a_sweep(tmp_path, capsys):
    s = sweep_dir(tmp_path / "s")
    (s / "2" / ".hydra").mkdir(parents=True)  # another sweep's job, copied in
    results.write_parquet_atomic(part_rows("elsewhere", 2), s / "2" / results.PART_NAME)
    assert collect_cli.main([str(s)]) == 2
    line = one_error_line(capsys)
    assert "holds the rows of 2 sweeps (sweep_id elsewhere, s)" in line and "--merge" in line
    assert not (s / results.RESULTS_NAME).exists()
    with pytest.raises(results.SeveralSweeps):
        results.collect(s, merge=False)
    # the end-of-sweep callback calls collect(root): a sweep moved and resumed holds two ids
    assert results.collect(s).table["job_id"].n_unique() == 3


def test_a_part_memsweep_did_not_write_is_reported_and_skipped(tmp_path):
    s = sweep_dir(tmp_path / "s", jobs=1)
    (s / "1").mkdir()
    pl.DataFrame({"a": [1, 2], "job_id": ["x", "y"]}).write_parquet(s / "1" / results.PART_NAME)
    no_ids = part_rows("s", 2).with_columns(pl.lit(None, pl.String).alias("job_id"))
    (s / "2").mkdir()
    no_ids.write_parquet(s / "2" / results.PART_NAME)
    got = results.collect(s)
    assert got.table.height == len(FORMULAS) and set(got.table["job_id"]) == {"s-0"}
    assert [(p.parent.name, why) for p, why in got.skipped] == [
        ("1", "not memsweep's: no columns sweep_id, model, formula, status"),
        ("2", "not memsweep's: rows without job_id")]
    out = io.StringIO()
    results.summarize(got, out=out)
    assert f"skipped part: {s / '1' / results.PART_NAME}: not memsweep's: no columns" in out.getvalue()


def test_a_folder_holding_only_foreign_parts_is_no_sweep(tmp_path, capsys):
    d = tmp_path / "data"
    (d / "0").mkdir(parents=True)
    pl.DataFrame({"a": [1]}).write_parquet(d / "0" / results.PART_NAME)
    assert collect_cli.main([str(d)]) == 2
    assert "not a sweep or run directory" in one_error_line(capsys)
    assert not (d / results.RESULTS_NAME).exists()
    assert results.sweep_markers(d) == {}


def test_a_sweep_directory_without_parts_is_exit_2_for_the_command(tmp_path, capsys):
    s = tmp_path / "s"
    (s / "0" / ".hydra").mkdir(parents=True)  # started, killed before its part
    (s / "multirun.yaml").write_text("hydra: {}\n")
    assert collect_cli.main([str(s)]) == 2
    assert f"error: DIR={str(s)!r}: holds no part memsweep wrote" in one_error_line(capsys)
    assert not (s / results.RESULTS_NAME).exists()


def test_a_results_parquet_memsweep_did_not_write_is_never_overwritten(tmp_path, capsys):
    s = sweep_dir(tmp_path / "s", jobs=1)
    mine = s / results.RESULTS_NAME
    pl.DataFrame({"user": ["mine"]}).write_parquet(mine)
    before = mine.read_bytes()
    assert collect_cli.main([str(s)]) == 2
    assert "memsweep did not write it" in capsys.readouterr().err
    assert mine.read_bytes() == before


# --- 3. --calibrate refuses data that cannot identify the constants -------------------------------

def measured_table(path: Path, jobs: list[tuple[str, int]]) -> Path:
    """A results Parquet of fake-measured jobs: (model, seq) each."""
    pl.concat([part_rows("m", i, model, seq, measured=True) for i, (model, seq) in enumerate(jobs)]).write_parquet(path)
    return path


def test_calibrating_on_one_model_is_refused_and_nothing_written(tmp_path, capsys):
    source = measured_table(tmp_path / "two.parquet", [("tiny", 256), ("tiny", 768)])  # the two rows
    report = tmp_path / "report"
    assert fit_cli.main([str(source), "--calibrate", "--report", str(report)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: PATH={str(source)!r}: not allowed; allowed: for --calibrate, measured jobs "
                           f"of at least 2 models") and "2 job(s) of 1 model (tiny)" in line
    assert not report.exists() and not list(tmp_path.rglob("*_calibrated.yaml"))


def test_a_named_formula_needs_more_jobs_outside_each_model_than_its_constants(tmp_path, capsys):
    jobs = [("tiny", 256), ("tiny", 768), ("gpt2", 256), ("gpt2", 768)]
    source = measured_table(tmp_path / "four.parquet", jobs)
    report = tmp_path / "report"
    assert fit_cli.main([str(source), "--calibrate", "seed_naive", "--report", str(report)]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: --calibrate='seed_naive': not allowed; allowed: more measured jobs outside "
                           "each model than the 2 constant(s) the fit moves (weight_matrices, gradient_factor)")
    assert "leaves 2 job(s) of 4" in line and not report.exists()
    # a plain --calibrate (every formula) says so in that formula's row, and writes no YAML for it
    table = pl.read_parquet(source)
    skip = fit_cli.check_calibration(table, ["seed_naive", "seed_rule4x"], named=False, sources=[str(source)])
    assert list(skip) == ["seed_naive"]
    lines = fit_cli.calibrate_all(table, ["seed_naive"], tmp_path / "out", [str(source)], skip)
    row = next(ln for ln in "\n".join(lines).splitlines() if ln.startswith("| seed_naive"))
    assert "not written: too few jobs: needs more measured jobs outside each model" in row
    assert not list((tmp_path / "out").glob("*.yaml"))


def test_the_time_model_needs_more_timed_jobs_than_its_constants(tmp_path, capsys):
    rows = []
    for i, seq in enumerate((256, 512)):  # two timed jobs of one model
        spec = job("gpt2", seq=seq)
        row = estimate_rows(spec, [get_formula("detailed")])[0]
        t = step_time(Columns.from_specs([spec]), Speeds.of([spec.hardware], [spec.dtype]),
                      TimeConstants(compute_efficiency=0.45))
        rows.append({**row, "sweep_id": "t", "job_id": f"t{i}", "job_num": i, "measure_backend": "cuda",
                     "step_time_s": float(t.step_s[0]), "measured_forward_s": float(t.forward_s[0]),
                     "measured_backward_s": float(t.backward_s[0]), "measured_optimizer_s": float(t.optimizer_s[0])})
    source = tmp_path / "timed.parquet"
    results.frame(rows).write_parquet(source)
    report = tmp_path / "report"
    assert fit_cli.main([str(source), "--calibrate", "time", "--report", str(report)]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: --calibrate='time': not allowed; allowed: more timed jobs than the ")
    assert not report.exists()


# --- 4. --install of a file --calibrate did not write ------------------------------------------------

def test_install_of_a_missing_yaml_says_it_does_not_exist_and_why(tmp_path, capsys):
    report = tmp_path / "fit"
    report.mkdir()
    (report / "fit_summary.md").write_text("| detailed | ... | not written: the refit does not lower the error |\n")
    missing = report / "detailed_calibrated.yaml"
    into = tmp_path / "conf"
    assert fit_cli.main(["--install", str(missing), "--into", str(into)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: --install={str(missing)!r}: not allowed; allowed: an existing file; this one "
                           f"does not exist (--calibrate writes <formula>_calibrated.yaml only when")
    assert str(report / "fit_summary.md") in line and not into.exists()


# --- 5. plan checks its output directory up front, as the sweep does --------------------------------

def test_plan_into_an_unwritable_directory_is_one_line_before_planning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plan_cli, "hydra_main", lambda: pytest.fail("planned into an unwritable directory"))
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    assert plan_cli.main([f"hydra.run.dir={afile}/plan"]) == 2
    assert one_error_line(capsys) == (f"error: hydra.run.dir='{afile}/plan': not allowed; allowed: a directory "
                                      f"({afile} is a file)")
    if Path("/proc/self").is_dir():  # the case: no directory can be made there
        assert plan_cli.main(["hydra.run.dir=/proc/x"]) == 2
        assert one_error_line(capsys).startswith("error: hydra.run.dir='/proc/x': not allowed; allowed: a writable "
                                                 "directory with free space (/proc: ")


def test_plan_output_dir_is_the_run_dir_given_or_plan_yamls(tmp_path):
    assert plan_cli.output_dir([]) == ("hydra.run.dir", Path("outputs/plan"))
    assert plan_cli.output_dir([f"hydra.run.dir={tmp_path}/p"]) == ("hydra.run.dir", tmp_path / "p")
    assert plan_cli.output_dir(["hydra.run.dir=/x/${now:%H}"]) == ("hydra.run.dir", Path("/x"))
