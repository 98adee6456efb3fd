"""memsweep as an installed tool: the wheel ships the presets and runs without the checkout; the
`memsweep` command dispatches to the sweep, plan, fit and collect; --help lists the presets;
scripts/accuracy.py runs without the launchers extra. About 15 s, most of it the wheel test."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import polars as pl
import pytest
from conftest import CONF, REPO

from memsweep.app.help import first_comment
from memsweep.app.main import main
from memsweep.formulas import FORMULAS
from memsweep.presets import CONF_DIR
from memsweep.results import RESULTS_NAME

GROUPS = ("model", "workload", "optimizer", "hardware", "parallel", "measure", "formula", "hydra/launcher")


def presets(conf: Path) -> list[str]:
    return sorted(str(p.relative_to(conf)) for p in conf.rglob("*.yaml"))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- packaging metadata -----------------------------------------------------------------------

def test_pyproject_packages_name_every_package_under_src():
    """setuptools' find cannot see conf/ mapped onto memsweep.conf, so the list is explicit: a new
    package under src/ must be added to it, or `pip install .` leaves it out."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = sorted(".".join(p.parent.relative_to(REPO / "src").parts) for p in (REPO / "src").rglob("__init__.py"))
    assert sorted(tool["packages"]) == sorted([*found, "memsweep.conf"]), (
        "pyproject.toml [tool.setuptools] packages must list every package under src/ (and memsweep.conf)")
    assert tool["package-dir"] == {"": "src", "memsweep.conf": "conf"}
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"memsweep": "memsweep.app.main:cli"}


def test_conf_dir_is_the_checkouts_from_a_checkout():
    if "MEMSWEEP_CONF" not in os.environ:
        assert CONF_DIR == CONF


def _wheel_tools() -> list[str]:
    """Build without isolation when this environment's setuptools can make a wheel (>= 70.1, or
    the `wheel` package); otherwise let pip fetch a build environment."""
    local = importlib.util.find_spec("wheel") or importlib.util.find_spec("setuptools.command.bdist_wheel")
    return ["--no-build-isolation"] if local else []


def test_the_wheel_ships_the_presets_and_runs_without_the_checkout(tmp_path):
    """`pip install .` (not editable): the wheel holds every preset under memsweep/conf, and an
    install of it alone (no checkout on the path, cwd elsewhere) composes the config and runs
    the sweep and the planner through the `memsweep` command's function."""
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside its sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(REPO / "src", src / "src", ignore=ignore)
    shutil.copytree(CONF, src / "conf", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    proc = subprocess.run([*pip, "wheel", "--no-deps", *_wheel_tools(), "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("memsweep-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(n.removeprefix("memsweep/conf/") for n in names if n.startswith("memsweep/conf/"))
    assert shipped == presets(CONF)  # every preset, config.yaml, plan.yaml, the launchers; no more
    for must in ("model/llama3-8b.yaml", "config.yaml", "plan.yaml", "hydra/launcher/local.yaml",
                 "hydra/launcher/slurm.yaml", "hydra/launcher/submitit.yaml", "hydra/launcher/batched.yaml",
                 "hydra/sweeper/memsweep.yaml"):
        assert f"memsweep/conf/{must}" in names, must
    # the batched launcher, in Hydra's plugin namespace (no __init__.py of its own: shared with others)
    assert "hydra_plugins/memsweep_batched_launcher/batched_launcher.py" in names
    assert "hydra_plugins/__init__.py" not in names
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "memsweep = memsweep.app.main:cli" in zipfile.ZipFile(wheel).read(entry).decode()

    site = tmp_path / "site"
    proc = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("MEMSWEEP_CONF", None)
    code = f"""
import json, sys
from hydra import compose, initialize_config_dir
import memsweep
from memsweep.presets import CONF_DIR
from memsweep.app.main import main
assert memsweep.__file__.startswith({str(site)!r}), memsweep.__file__
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("config", overrides=["model=llama3-8b", "hardware=a100-80g"])
print(json.dumps({{"conf": str(CONF_DIR), "model": cfg.model.name, "layers": cfg.model.layers,
                  "hardware": cfg.hardware.name, "seq": cfg.seq}}))
sys.stdout.flush()
code = main(["model=gpt2", "seq=128", "hydra.run.dir=run"])
code = code or main(["plan", "models=[gpt2]", "hardware=[a100-80g]", "seqs=[512]", "workloads=[inference]",
                     "hydra.run.dir=plan"])
code = code or main(["-m", "model=gpt2", "seq=128,256", "hydra/launcher=batched", "hydra.sweep.dir=multi"])
# issue 27: `memsweep import PATH` writes ./conf/model/NAME.yaml (never into the package) ...
code = code or main(["import", {str(REPO / "tests" / "data" / "hf_configs" / "olmo2-7b.json")!r}, "--name", "olmo2"])
# ... which the sweep reads beside the shipped presets
code = code or main(["--config-dir", "conf", "model=olmo2", "seq=256", "hydra.run.dir=imported"])
sys.exit(code)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    composed = json.loads(proc.stdout.splitlines()[0])
    assert composed == {"conf": str(site / "memsweep" / "conf"), "model": "llama3-8b", "layers": 32,
                        "hardware": "a100-80g", "seq": 2048}
    t = pl.read_parquet(cwd / "run" / RESULTS_NAME)
    assert sorted(t["formula"]) == sorted(FORMULAS) and set(t["status"]) == {"ok"}
    assert set(t["model"]) == {"gpt2"} and set(t["seq"]) == {128} and set(t["hardware"]) == {"h100-80g"}
    assert (cwd / "run" / "sweep.log").is_file()
    assert (cwd / "plan" / "plan.parquet").is_file() and (cwd / "plan" / "plan.log").is_file()
    assert pl.read_parquet(cwd / "multi" / "batch-0-1" / "rows.parquet")["job_num"].unique().sort().to_list() == [0, 1]
    assert (cwd / "conf" / "model" / "olmo2.yaml").is_file() and not (site / "memsweep" / "conf" / "model" / "olmo2.yaml").exists()
    assert "memsweep --config-dir" in proc.stdout and "7,298,617,344 parameters" in proc.stdout
    imported = pl.read_parquet(cwd / "imported" / RESULTS_NAME)
    assert set(imported["model"]) == {"olmo2"} and set(imported["params"]) == {7_298_617_344}


# --- the command ------------------------------------------------------------------------------

def test_help_lists_every_group_option_and_top_level_key(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("usage: memsweep ") and "plan|fit|collect|import" in lines[1]
    assert all(len(line) <= 140 for line in lines)
    for group in GROUPS:
        assert f"\n  {group}" in out, group
        for p in sorted((CONF / group).glob("*.yaml")):
            line = next((x for x in lines if x.split()[:1] == [p.stem]), None)
            assert line is not None, f"{group}={p.stem} missing"
    m = re.search(r"^    llama3-8b +(.+(?:\n {5,}\S.*)*)", out, re.M)  # an entry may wrap onto indented lines
    llama = " ".join(m.group(1).split())
    assert "Llama 3 8B" in llama and "8,030,261,248 parameters" in llama
    assert first_comment(CONF / "model" / "llama3-8b.yaml").startswith("Llama 3 8B (HF ")
    assert "  model   (default: llama2-7b)" in lines and "  formula   (default: none)" in lines
    seq = next(x for x in lines if x.startswith("  seq="))
    assert "tokens per sequence" in seq
    for key in ("batch=", "dtype=", "offload.optimizer=", "loss.chunks=", "formulas="):
        assert any(x.startswith(f"  {key}") for x in lines), key


def test_sweep_py_help_is_the_same_listing():
    proc = subprocess.run([sys.executable, str(REPO / "sweep.py"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python sweep.py ")
    assert "llama3-8b" in proc.stdout and "Powered by Hydra" not in proc.stdout


def test_memsweep_and_sweep_py_run_the_same_job(tmp_path):
    """`memsweep ARGS` is `python sweep.py ARGS`: the same rows (and the same job ids)."""
    args = ["model=gpt2", "seq=128", "workload=lora"]
    tables = []
    for name, cmd in (("script", [str(REPO / "sweep.py")]), ("command", ["-m", "memsweep.app.main"])):
        proc = subprocess.run([sys.executable, *cmd, *args, f"hydra.run.dir={tmp_path / name}"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        tables.append(pl.read_parquet(tmp_path / name / RESULTS_NAME).drop("sweep_id").sort("formula"))
    assert tables[0].equals(tables[1]) and tables[0].height == len(FORMULAS)
    assert main(["collect", str(tmp_path / "command")]) == 0


def test_subcommands_dispatch_and_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["sq=5"]) == 2
    assert one_line_error(capsys).startswith("error: sq='5': not allowed; allowed: top-level keys: seq, ")
    assert main(["plan", "model=llama3-8b"]) == 2
    assert one_line_error(capsys).startswith("error: model='llama3-8b': not allowed; allowed: plan keys")
    assert main(["fit", str(tmp_path / "none.parquet")]) == 2
    assert one_line_error(capsys).startswith("error: ")
    assert main(["collect", str(tmp_path / "no")]) == 2
    assert one_line_error(capsys).startswith("error: DIR=")
    for sub in ("fit", "collect"):
        with pytest.raises(SystemExit) as exc:
            main([sub, "--help"])
        assert exc.value.code == 0 and capsys.readouterr().out.startswith(f"usage: memsweep {sub} ")
    assert main(["plan", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: memsweep plan ") and "margin:" in out and "hydra:" not in out


# --- scripts/accuracy.py without the launchers extra ------------------------------------------

def test_accuracy_script_runs_without_the_launchers_extra(tmp_path, monkeypatch, capsys):
    """Without hydra-joblib-launcher / hydra-submitit-launcher there is no `hydra_plugins` package
    at all (sys.modules[...] = None makes its import fail the same way): --jobs 2 runs the grid
    one job at a time instead of crashing, and the report says where it went."""
    spec = importlib.util.spec_from_file_location("accuracy_script", REPO / "scripts" / "accuracy.py")
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    monkeypatch.setitem(sys.modules, "hydra_plugins", None)
    # an earlier test may have imported the plugin: a None entry stands for "not installed" there too
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_joblib_launcher", None)
    assert accuracy.joblib_launcher_installed() is False
    accuracy.run(tmp_path, "gpt2", 2, grid=lambda models: {"analytic": [f"model={models}", "seq=128"]})
    assert "running jobs one at a time" in capsys.readouterr().out
    assert (tmp_path / "analytic" / RESULTS_NAME).is_file()
    monkeypatch.setattr(sys, "argv", ["accuracy.py", "--from", str(tmp_path)])
    accuracy.main()  # no measured rows: the goal is missed (exit 1), the report is still written
    assert f"report: {tmp_path / 'accuracy.md'}" in capsys.readouterr().out
    assert (tmp_path / "accuracy.md").is_file()


def test_a_launcher_without_its_plugin_is_one_line_exit_2(tmp_path):
    code = ("import sys; sys.modules['hydra_plugins'] = None; from memsweep.app.main import main; "
            f"sys.exit(main(['-m', 'model=gpt2', 'hydra/launcher=local', 'hydra.sweep.dir={tmp_path}']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: In 'hydra/launcher/local': Could not load 'hydra/launcher/joblib'; "
                                  "the launchers need: pip install 'memsweep[launchers]'")



# --- the house: imports go one way --------------------------------------------------------------

def _module_imports(lazy: bool = False) -> dict[str, set[str]]:
    """Each memsweep module's memsweep imports at module level (with `lazy`, inside functions too:
    how a layer reaches up on purpose, e.g. measure's torch code)."""
    import ast

    root = REPO / "src" / "memsweep"
    names = {".".join(("memsweep", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
             for p in root.rglob("*.py")}
    graph = {}
    for p in root.rglob("*.py"):
        mod = ".".join(("memsweep", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        deps = set()
        tree = ast.parse(p.read_text())
        for node in (ast.walk(tree) if lazy else tree.body):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("memsweep"):
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names} & names
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("memsweep")}
        graph[mod] = deps & names
    return graph


def test_no_module_imports_itself_around_a_circle():
    """Issue 27: specs -> capacity -> formulas.techniques -> columns -> specs was a circle; capacity
    is a leaf now. Any circle among module-level imports fails here, named."""
    graph = _module_imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError(" -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    core = {"memsweep.errors", "memsweep.units", "memsweep.capacity", "memsweep.specs"}
    anywhere = _module_imports(lazy=True)
    for mod in core:  # the data layer imports only itself, not even lazily
        assert anywhere[mod] <= core, (mod, anywhere[mod] - core)
    assert anywhere["memsweep.capacity"] <= {"memsweep.errors"}
