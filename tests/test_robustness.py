"""Issue 11: nothing lost, nothing silently wrong. One test (or more) per numbered case of the
issue; each failed before its fix. Subprocess sweeps are few and use model=tiny."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
import yaml
from conftest import CONF, REPO, job

from memsweep.app.convert import to_job_spec
from memsweep.calibrate import calibrate, constants_dict
from memsweep.columns import Columns
from memsweep.errors import ConfigError
from memsweep.estimate import estimate_rows
from memsweep.formulas import FORMULAS, job_formulas
from memsweep.results import PART_NAME, RESULTS_NAME, _HOST, collect
from memsweep.specs import MeasureSpec

PY = sys.executable


def run(script: str, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(REPO / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kw.pop("cwd", REPO), **kw)


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The stderr of a refused command: exactly one line, starting with 'error:'."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def spec_error(compose_config, *overrides: str) -> str:
    """The one-line ConfigError of a job (what its error row says)."""
    with pytest.raises(ConfigError) as info:
        spec = to_job_spec(compose_config(*overrides))
        estimate_rows(spec, job_formulas(spec))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """A finished two-job sweep, copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    proc = run("sweep.py", "-m", "model=tiny", "seq=64,128", f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, proc.stderr
    return out


# --- 1. collect never replaces a table with less ------------------------------------------------

def test_collect_keeps_a_table_the_parts_cannot_rebuild(small_sweep, tmp_path):
    d = tmp_path / "only-results"
    d.mkdir()
    shutil.copy(small_sweep / RESULTS_NAME, d / RESULTS_NAME)
    before = (d / RESULTS_NAME).read_bytes()
    proc = run("scripts/collect.py", str(d))
    assert proc.returncode == 2
    assert one_line(proc).startswith(f"error: kept {d / RESULTS_NAME} (10 rows): the parts hold 0 rows")
    assert (d / RESULTS_NAME).read_bytes() == before


def test_collect_rewrites_when_nothing_is_lost_and_cleans_killed_writes(small_sweep, tmp_path):
    d = tmp_path / "s"
    shutil.copytree(small_sweep, d)
    part_dir = sorted(d.glob(f"*/{PART_NAME}"))[0].parent  # a job's (or a batch's) directory
    dead = part_dir / f".{PART_NAME}~{_HOST}~999999999~abc.tmp"  # a writer that no longer exists
    dead.write_bytes(b"half a part")
    mine = part_dir / f".{PART_NAME}~{_HOST}~{os.getpid()}~abc.tmp"  # a write in flight
    mine.write_bytes(b"in flight")
    c = collect(d)
    assert c.kept is None and c.table.height == 10 and c.cleaned == 1
    assert not dead.exists() and mine.exists()


# --- 2. a sweep directory belongs to one grid ---------------------------------------------------

def test_a_second_grid_is_refused_unless_added(small_sweep, tmp_path):
    d = tmp_path / "s"
    shutil.copytree(small_sweep, d)
    before = sorted(p.name for p in d.iterdir() if p.is_dir())
    refused = run("sweep.py", "-m", "model=tiny", "batch=2,3", f"hydra.sweep.dir={d}")
    assert refused.returncode == 2
    assert "holds another grid (model=tiny seq=64,128)" in one_line(refused)
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == before  # no job ran
    added = run("sweep.py", "-m", "model=tiny", "batch=2,3", "add=true", f"hydra.sweep.dir={d}")
    assert added.returncode == 0, added.stderr
    resumed = run("sweep.py", "-m", "model=tiny", "seq=64,128", "resume=true", f"hydra.sweep.dir={d}")
    assert resumed.returncode == 0 and resumed.stdout.count("resume: rows exist, skipped") == 2
    t = pl.read_parquet(d / RESULTS_NAME)
    assert t["job_id"].n_unique() == 4 and t.height == 20  # both grids, every job once
    assert sorted(set(zip(t["seq"], t["batch"]))) == [(64, 1), (128, 1), (2048, 2), (2048, 3)]


# --- 3. values whose byte counts int64 cannot hold ----------------------------------------------

@pytest.mark.parametrize("overrides, key, bound", [
    (("seq=1000000000000",), "seq=", "2^31 - 1"),  # past any count a key takes (issue 27)
    (("batch=1000000000000",), "batch=", "2^31 - 1"),
    (("model.layers=1000000000000",), "model.layers=", "65536"),
    (("grad_accum=9223372036854775808",), "grad_accum=", "2^31 - 1"),
    (("loss.chunks=" + str(10**30),), "loss.chunks=", "2^31 - 1"),
    (("parallel=zero3", "parallel.dp=" + str(2**63)), "parallel.dp=", "2^31 - 1"),
    (("seq=2147483647", "batch=2147483647"), "batch=", "at most 2^63-1"),  # each in range, the bytes not
    (("attention=eager", "seq=100000000"), "seq=", "at most 2^63-1"),
])
def test_unrepresentable_byte_counts_name_the_key(compose_config, overrides, key, bound):
    message = spec_error(compose_config, *overrides)
    assert message.startswith(key) and bound in message


def test_an_overflowing_job_is_an_error_row_and_the_sweep_is_collected(tmp_path):
    proc = run("sweep.py", "-m", "model=tiny", "seq=512,1000000000000,1024", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    t = pl.read_parquet(tmp_path / RESULTS_NAME)
    assert t["job_id"].n_unique() == 3
    bad = t.filter(pl.col("status") == "error")
    assert bad.height == 1 and bad["error"][0].startswith("seq=1000000000000: not allowed")


# --- 4. read-only or full output directory -------------------------------------------------------

def _unshare(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def private_mounts():
    """A mount namespace where this user may mount a size-limited tmpfs; skipped where it cannot."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    probe = _unshare("mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs /tmp")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")


def test_read_only_output_dir_is_one_line_before_any_job(private_mounts, tmp_path):
    m = tmp_path / "ro"
    m.mkdir()
    proc = _unshare(f"mount -t tmpfs -o size=1m,ro tmpfs {m} && {PY} sweep.py -m model=tiny seq=64,128 "
                    f"hydra.sweep.dir={m}/x")
    assert proc.returncode == 2
    assert one_line(proc) == (f"error: hydra.sweep.dir='{m}/x': not allowed; allowed: a writable directory "
                              f"with free space ({m}: Read-only file system)")


@pytest.mark.parametrize("launcher", ["basic", "batched"])
def test_disk_full_mid_sweep_is_one_line_and_parts_stay(private_mounts, tmp_path, launcher):
    m = tmp_path / "full"
    m.mkdir()
    # room for the probe and about one job (basic: Hydra's own config save of a later job fails;
    # batched: the one batch's part fits, the table does not)
    proc = _unshare(f"mount -t tmpfs -o size=200k tmpfs {m} && dd if=/dev/zero of={m}/fill bs=1k count=120 "
                    f"2>/dev/null; {PY} sweep.py -m model=tiny seq=64,128,256,512,1024 hydra/launcher={launcher} "
                    f"hydra.sweep.dir={m}/x; "
                    f"echo rc=$?; ls {m}/x/*/{PART_NAME} | wc -l")
    rc = int(proc.stdout.split("rc=")[1].split()[0])
    assert rc == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in proc.stderr and len(errors) >= 1
    assert errors[-1].startswith("error: cannot write ") and "No space left on device" in errors[-1]
    assert int(proc.stdout.strip().splitlines()[-1]) >= 1  # the parts written before stay


def test_collect_on_a_full_disk_is_one_line(private_mounts, small_sweep, tmp_path):
    m = tmp_path / "full"
    m.mkdir()
    proc = _unshare(f"mount -t tmpfs -o size=200k tmpfs {m} && cp -r {small_sweep} {m}/s && rm {m}/s/{RESULTS_NAME} && "
                    f"(dd if=/dev/zero of={m}/fill bs=1k count=400 2>/dev/null; true) && "
                    f"{PY} scripts/collect.py {m}/s")
    assert proc.returncode == 1
    assert one_line(proc) == f"error: cannot write {m}/s/{RESULTS_NAME}: No space left on device"


# --- 5. stopping a joblib sweep stops its workers -------------------------------------------------

def _children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def test_killing_a_joblib_sweep_stops_its_workers(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = subprocess.Popen([PY, str(REPO / "sweep.py"), "-m", "model=llama3.2-1b", "measure=fake",
                             "seq=512,1024,2048,4096", "batch=1,2,3", "hydra/launcher=local",
                             f"hydra.sweep.dir={tmp_path}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(f"*/{PART_NAME}")) and time.time() < deadline:
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert workers, "no worker processes seen"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    alive = [p for p in workers if _alive(p)]
    for p in alive:  # do not leave them to the next test
        os.kill(p, signal.SIGKILL)
    assert not alive, "workers outlived the sweep"
    before = len(list(tmp_path.glob(f"*/{PART_NAME}")))
    time.sleep(1.5)
    assert len(list(tmp_path.glob(f"*/{PART_NAME}"))) == before  # nobody writes parts any more


# --- 6. formula.constants overrides take effect --------------------------------------------------

def test_formula_constant_overrides_take_effect_and_land_in_spec_json(compose_config):
    spec = to_job_spec(compose_config("formula=detailed", "formula.constants.overhead_bytes=1073741824"))
    rows = {r["formula"]: r for r in estimate_rows(spec, job_formulas(spec))}
    plain = {r["formula"]: r for r in estimate_rows(job("llama2-7b"), list(FORMULAS.values()))}
    assert rows["detailed"]["overhead_bytes"] == 1073741824
    assert rows["detailed"]["total_bytes"] == plain["detailed"]["total_bytes"] + 1073741824
    assert ["overhead_bytes", 1073741824.0] in json.loads(rows["detailed"]["spec_json"])["formula_constants"]


# --- 7. values accepted silently before -----------------------------------------------------------

@pytest.mark.parametrize("args, line", [
    (("resume=abc",), "error: resume='abc': not allowed; allowed: true, false"),
    (("resume=1",), "error: resume='1': not allowed; allowed: true, false"),
    (("add=maybe",), "error: add='maybe': not allowed; allowed: true, false"),
])
def test_switches_are_checked_before_any_job(tmp_path, args, line):
    proc = run("sweep.py", "-m", "model=tiny", *args, f"hydra.sweep.dir={tmp_path}/s")
    assert proc.returncode == 2 and one_line(proc) == line
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("overrides, start", [
    (("model.name=1.5",), "model.name=1.5: not allowed; allowed: a non-empty name"),
    (("model.name=''",), "model.name='': not allowed; allowed: a non-empty name"),
    (("hardware.name=''",), "hardware.name='': not allowed"),
    (("workload=lora", "workload.lora_rank=5000"),
     "workload.lora_rank=5000: not allowed; allowed: at most 4096 for llama2-7b (q: 4096 x 4096"),
    (("model=llama3-8b", "workload=lora", "workload.lora_targets=[q,k]", "workload.lora_rank=2048"),
     "workload.lora_rank=2048: not allowed; allowed: at most 1024 for llama3-8b (k: 4096 x 1024"),
    (("workload.lora_rank=8",), "workload.lora_rank=8: not allowed; allowed: 0 for workload kind train"),
    (("workload.lora_targets=[q]",), "workload.lora_targets=['q']: not allowed; allowed: [] for workload kind train"),
    (("workload.gen_tokens=64",), "workload.gen_tokens=64: not allowed; allowed: 0 for workload kind train"),
    (("model=tiny", "model.head_dim=15"), "model.head_dim=15"),
])
def test_silently_accepted_values_are_refused(compose_config, overrides, start):
    assert spec_error(compose_config, *overrides).startswith(start)


# --- 8. calibration --------------------------------------------------------------------------------

def test_constants_the_data_cannot_inform_keep_their_values():
    # F3 on one model: its model-state columns are constant, so collinear (the zeroed
    # optimizer_factor / gradient / master / state bytes)
    specs = [job("llama3.2-1b", seq=s) for s in (512, 1024, 2048, 4096)]
    c = Columns.from_specs(specs)
    measured = FORMULAS["detailed"](c).total
    k = FORMULAS["seed_korthikanti"]
    fit = calibrate(k, c, measured)
    kept = constants_dict(fit.formula)
    for name in ("weight_bytes_per_param", "gradient_bytes_per_param", "master_bytes_per_param", "state_bytes"):
        assert name not in fit.fitted and kept[name] == getattr(k.constants, name)
    det = calibrate(FORMULAS["detailed"], c, measured * 1.1)
    assert constants_dict(det.formula)["optimizer_factor"] == 1.0
    # collinear across models too: gradient, master and state bytes all scale with the parameters
    c2 = Columns.from_specs([job(m, seq=s) for m in ("llama3.2-1b", "llama3-8b", "qwen2.5-7b") for s in (512, 2048)])
    fit2 = calibrate(k, c2, FORMULAS["detailed"](c2).total)
    assert not {"gradient_bytes_per_param", "master_bytes_per_param", "state_bytes"} & set(fit2.fitted)
    assert all(v > 0 for v in constants_dict(fit2.formula).values())


def test_calibration_is_judged_held_out_and_written_beside_the_report(measured_sweep, tmp_path):
    report = tmp_path / "report"
    proc = run("scripts/fit.py", str(measured_sweep), "--calibrate", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    written = sorted(p.name for p in report.glob("*_calibrated.yaml"))
    assert not list((CONF / "formula").glob("*_calibrated.yaml"))  # never into the package
    assert written, proc.stdout
    for name in written:
        doc = yaml.safe_load((report / name).read_text())
        prov = doc["provenance"]
        held = [k for k in ("lomo", "split") if f"{k}_after_pct" in prov]
        assert held and all(prov[f"{k}_after_pct"] <= prov[f"{k}_before_pct"] for k in held)
        assert any(prov[f"{k}_after_pct"] < prov[f"{k}_before_pct"] for k in held)
    calibration = proc.stdout.split("## Calibration", 1)[1]
    for line in calibration.splitlines():  # the others say why they were not written
        if line.startswith("| seed_") or line.startswith("| detailed"):
            assert line.rstrip(" |").endswith(".yaml") or "not written: " in line


def test_a_calibrated_formula_joins_a_sweep_only_when_installed_and_selected(measured_sweep, tmp_path):
    report = tmp_path / "report"
    run("scripts/fit.py", str(measured_sweep), "--calibrate", "seed_rule4x", "--report", str(report))
    (name,) = [p.stem for p in report.glob("*_calibrated.yaml")]
    into_package = run("scripts/fit.py", "--install", str(report / f"{name}.yaml"), "--into", str(CONF))
    assert into_package.returncode == 2 and "outside the package's" in one_line(into_package)
    user = tmp_path / "user-conf"
    installed = run("scripts/fit.py", "--install", str(report / f"{name}.yaml"), "--into", str(user))
    assert installed.returncode == 0 and (user / "formula" / f"{name}.yaml").is_file()
    plain = run("sweep.py", "model=tiny", f"hydra.run.dir={tmp_path}/r1")
    chosen = run("sweep.py", "--config-dir", str(user), f"formula={name}", "model=tiny", f"hydra.run.dir={tmp_path}/r2")
    assert plain.returncode == 0 and chosen.returncode == 0, chosen.stderr
    assert set(pl.read_parquet(tmp_path / "r1" / RESULTS_NAME)["formula"]) == set(FORMULAS)
    assert set(pl.read_parquet(tmp_path / "r2" / RESULTS_NAME)["formula"]) == {*FORMULAS, name}


# --- 9. fit.py and plan.py on bad input --------------------------------------------------------------

def test_fit_refuses_paths_without_measurements(small_sweep, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = tmp_path / "foreign.parquet"
    pl.DataFrame({"a": [1, 2]}).write_parquet(foreign)
    for path in (empty, small_sweep, foreign):
        proc = run("scripts/fit.py", str(path))
        assert proc.returncode == 2
        assert one_line(proc) == (f"error: PATH='{path}': not allowed; allowed: sweeps with measured rows "
                                  f"(run them with measure=fake|cpu|cuda)")


def test_fit_bad_spec_json_and_report_paths(measured_sweep, tmp_path):
    t = pl.read_parquet(measured_sweep / RESULTS_NAME).with_columns(pl.lit("{not json").alias("spec_json"))
    bad = tmp_path / "bad.parquet"
    t.write_parquet(bad)
    proc = run("scripts/fit.py", str(bad), "--calibrate", "detailed", "--report", str(tmp_path / "r"))
    assert proc.returncode == 2 and one_line(proc).startswith("error: spec_json='{not json': not allowed")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    proc = run("scripts/fit.py", str(measured_sweep), "--report", str(a_file))
    assert proc.returncode == 2 and "--report=" in one_line(proc)
    proc = run("scripts/fit.py", str(measured_sweep), "--calibrate", "detailed", "--report", str(tmp_path / "r2"),
               "--out", str(a_file / "sub"))
    assert proc.returncode == 2 and one_line(proc).startswith(f"error: --out='{a_file}/sub': not allowed")


@pytest.mark.parametrize("arg, start", [
    ("formula=[1,2]", "error: formula=[1, 2]: not allowed"),
    ("gpus_batch=1000000000000", "error: gpus_batch=1000000000000: not allowed; allowed: an integer >= 1 and <= 2147483647"),
    ("precisions=[int4-mixed]", "error: precisions='int4-mixed': not allowed"),
])
def test_plan_bad_values_are_one_line(tmp_path, arg, start):
    proc = run("scripts/plan.py", arg, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and one_line(proc).startswith(start)


# --- 10. exit codes --------------------------------------------------------------------------------

def test_skipped_jobs_are_results_not_failures(tmp_path):
    # an fp8 KV cache is analytic only: its measurement is skipped, the estimate stays
    proc = run("sweep.py", "-m", "model=tiny", "workload=inference", "kv_dtype=fp8,auto", "measure=fake",
               "formulas=[detailed]", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert set(pl.read_parquet(tmp_path / RESULTS_NAME)["status"]) == {"ok", "skipped"}


# --- 11. messages that name the key --------------------------------------------------------------------

@pytest.mark.parametrize("overrides, start", [
    (("formula=detailed", "formula.base=[1,2]"), "formula.base=[1, 2]: not allowed"),
    (("seq=${nosuch}",), "seq='${nosuch}': not allowed; allowed: a value, or an interpolation that resolves"),
    (("formulas=[../model/gpt2]",), "formulas='../model/gpt2': not allowed"),
])
def test_messages_name_the_key(compose_config, overrides, start):
    assert spec_error(compose_config, *overrides).startswith(start)


def test_formula_null_is_the_default_spelled_out(tmp_path):
    proc = run("sweep.py", "model=tiny", "formula=null", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert set(pl.read_parquet(tmp_path / RESULTS_NAME)["formula"]) == set(FORMULAS)


# --- 12. no torch traceback flood from measure=fake ------------------------------------------------------

def test_a_failing_fake_measurement_is_one_row_without_torch_log_flood(monkeypatch, caplog):
    torch = pytest.importorskip("torch")
    from memsweep.measure import backends

    def broken(*args, **kwargs):  # a meta kernel that fails, as a configuration the model cannot run
        torch.mm(torch.empty(2, 3), torch.empty(4, 5))

    monkeypatch.setattr(backends, "prepare", broken)
    with caplog.at_level(logging.DEBUG):
        m = backends.measure(job("tiny", seq=16, measure=MeasureSpec(name="fake", backend="fake")))
    assert m.status == "error" and m.error.startswith("measure=fake: RuntimeError: a and b must have same reduction dim")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
