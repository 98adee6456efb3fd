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
