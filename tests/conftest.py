"""Shared helpers: the repo's presets as specs (via memsweep.presets), importable by every test."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
sys.path.insert(0, str(REPO / "src"))

from memsweep.presets import job_spec as job  # noqa: E402,F401
from memsweep.presets import load_preset, model_spec as model, preset_names  # noqa: E402,F401
from memsweep.presets import workload_spec as workload  # noqa: E402,F401


import subprocess  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def compose_config():
    """Hydra's composition of conf/config.yaml, as a sweep composes a job:
    `compose_config("model=tiny", "seq=64")` -> the job's DictConfig (hydra node included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()


def same_phases(fake, cpu) -> None:
    """Every phase peak of a fake run equals a real one's, but decode's: fake jumps the KV cache to
    its last token in one concatenation per layer (KVCache.jump, measure/hf.py's _jump) while cpu
    decodes every token; the jump's own transient differs from the skipped steps' by a few
    hundred bytes at test sizes, below the last step's, which is the decode peak."""
    assert {k: v for k, v in fake.phase_peaks.items() if k != "decode"} == {
        k: v for k, v in cpu.phase_peaks.items() if k != "decode"}
    if "decode" in cpu.phase_peaks:
        assert abs(fake.phase_peaks["decode"] - cpu.phase_peaks["decode"]) <= 0.02 * cpu.phase_peaks["decode"]


@pytest.fixture(scope="session")
def measured_sweep(tmp_path_factory):
    """A small fake-measured multirun shared by the calibration and robustness tests (one run,
    about 15 s): 3 small presets x 2 seqs x 2 workloads (pure bf16). Tests must not write into it."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("measured")
    proc = subprocess.run(
        # dropout off in all three (gpt2's preset has its config.json's 0.1): F3 as written counts
        # dropout masks in every model, so one set of constants can describe the three only when
        # they agree; the tests check calibration's mechanics, and test_dropout.py dropout's bytes
        [sys.executable, str(REPO / "sweep.py"), "-m", "model=tiny,qwen2.5-0.5b,gpt2", "seq=256,768",
         "workload=train,inference", "precision=pure", "measure=fake", "model.attention_dropout=0",
         "model.hidden_dropout=0", "model.embedding_dropout=0", f"hydra.sweep.dir={out}"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out
