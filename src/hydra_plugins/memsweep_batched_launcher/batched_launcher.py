"""The batched launcher and memsweep's sweeper (Hydra plugins; the work is in memsweep.app.batched).

Hydra's basic sweeper composes every job once to check the batch before the launcher starts, and
the basic launcher composes it again to run it: about 70 ms a job, twice, for an estimate that
takes well under a millisecond. `BatchedLauncher` composes once per combination of config-group
choices and applies each job's value overrides to a copy; `MemsweepSweeper` lets it do the check.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.memsweep_batched_launcher.batched_launcher.BatchedLauncher"
    # analytic jobs per part file (and per evaluation); a crash loses at most one batch's work
    batch_size: int = 1000
    # a progress bar on stderr: None = when stderr is a terminal
    progress: Optional[bool] = None


ConfigStore.instance().store(group="hydra/launcher", name="memsweep_batched", node=BatchedLauncherConf,
                             provider="memsweep")


class BatchedLauncher(Launcher):
    """Analytic jobs (measure=none) estimated together and written one part per batch; every
    other job (a measurement, a configuration only Hydra's full composition builds) run one by
    one as Hydra's basic launcher runs it."""

    def __init__(self, batch_size: int = 1000, progress: Optional[bool] = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.progress = progress
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None
        self.planned: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def validate(self, job_overrides: Sequence[Sequence[str]]) -> None:
        """Check every job's configuration before any runs (what the basic sweeper does by
        composing each): one composition per group combination; Hydra's error if one fails."""
        from memsweep.app import batched

        self.planned = batched.plan(self, job_overrides)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from memsweep.app import batched

        return batched.launch(self, job_overrides, initial_job_idx)


class MemsweepSweeper(BasicSweeper):
    """Hydra's basic sweeper (every combination of the -m values); a launcher that checks its
    jobs' configurations itself (`validate`) does, instead of a full composition per job."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        validate = getattr(self.launcher, "validate", None)
        if callable(validate):
            validate(batch)
        else:
            super().validate_batch_is_legal(batch)
