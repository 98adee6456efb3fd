"""Hydra callbacks: collect the parts into `results.parquet` when a run or multirun ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from memsweep.results import collect, summarize


class CollectResults(Callback):
    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra has un-set HydraConfig by now; run_job recorded the run's output dir on `config`.
        summarize(collect(Path(config.hydra.runtime.output_dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize(collect(Path(config.hydra.sweep.dir)))
