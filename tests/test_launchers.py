"""Every shipped launcher produces the same table as Hydra's basic one (timing aside); the batched
launcher (the default) has its own tests, tests/test_batched.py."""

from __future__ import annotations

import subprocess
import sys

import polars as pl
import pytest
from conftest import REPO

from memsweep.results import RESULTS_NAME

TIMING = ["sweep_id", "job_num", "step_time_s", "tokens_per_s", "measure_wall_s"]
GRID = ["-m", "model=tiny", "seq=64,128", "batch=1,2", "measure=fake"]


def run(tmp_path, launcher: str) -> pl.DataFrame:
    out = tmp_path / launcher
    extra = [f"hydra/launcher={launcher}"]
    proc = subprocess.run([sys.executable, str(REPO / "sweep.py"), *GRID, *extra, f"hydra.sweep.dir={out}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pl.read_parquet(out / RESULTS_NAME).drop(TIMING).sort("job_id", "formula")


@pytest.mark.parametrize("launcher,plugin", [("local", "hydra_plugins.hydra_joblib_launcher"),
                                             ("submitit", "hydra_plugins.hydra_submitit_launcher")])
def test_launcher_table_equals_the_basic_launchers(tmp_path, launcher, plugin):
    pytest.importorskip("torch")
    # importorskip, not find_spec: without the launchers extra there is no hydra_plugins to search
    pytest.importorskip(plugin, reason=f"{plugin} is not installed (pip install -e '.[launchers]')")
    basic, other = run(tmp_path, "basic"), run(tmp_path, launcher)
    assert basic.height == 4 * 5 and set(basic["status"]) == {"ok"}
    assert other.equals(basic)
