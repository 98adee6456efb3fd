"""Shared helpers: the repo's presets as specs, and one-job spec construction."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
sys.path.insert(0, str(REPO / "src"))

from memsweep.specs import (  # noqa: E402
    Hardware, JobSpec, ModelSpec, OptimizerSpec, Parallel, Workload,
)


def load_yaml(group: str, name: str) -> dict:
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text())


def preset_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def model(name: str, **changes) -> ModelSpec:
    return ModelSpec(**{**load_yaml("model", name), **changes})


def workload(name: str = "train", **changes) -> Workload:
    d = {**load_yaml("workload", name), **changes}
    d["lora_targets"] = tuple(d.get("lora_targets", ()))
    return Workload(**d)


def job(model_name: str = "llama2-7b", *, wl: str | Workload = "train", optimizer: str = "adamw",
        parallel: str | Parallel = "single", hardware: str = "h100-80g", **top) -> JobSpec:
    kwargs = dict(seq=2048, batch=1, dtype="bf16", precision="mixed", recompute="none", attention="sdpa")
    kwargs.update(top)
    return JobSpec(
        model=model(model_name) if isinstance(model_name, str) else model_name,
        workload=workload(wl) if isinstance(wl, str) else wl,
        optimizer=OptimizerSpec(**load_yaml("optimizer", optimizer)),
        parallel=Parallel(**load_yaml("parallel", parallel)) if isinstance(parallel, str) else parallel,
        hardware=Hardware(**load_yaml("hardware", hardware)),
        **kwargs,
    )


@pytest.fixture
def venv_python() -> str:
    return sys.executable
