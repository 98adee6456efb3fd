"""The batched launcher's work (`hydra/launcher=batched`; the Hydra plugin that calls it lives in
src/hydra_plugins/memsweep_batched_launcher/).

Hydra's basic launcher composes each job's config in full (and its sweeper once more to check it
first), about 70 ms a job for an estimate that takes far less. Here, for analytic jobs:

- **Configurations.** One composition per distinct combination of config-group choices (model=,
  workload=, optimizer=, hardware=, parallel=, measure=, formula=, and hydra.* overrides); each
  job's value overrides (`seq=512`, `model.layers=4`, `formulas=[detailed]`) are applied to a copy
  of it as plain data, by Hydra's rules (the key must exist). A job whose overrides need more (an
  interpolation, `+key=`, a dict value, a typed node) is composed in full and runs on its own.
- **Validation.** Each configuration goes through `job.prepare`, as in `job.run_job`: a bad value
  is an error row with the same one-line message, never a lost sweep.
- **Evaluation.** A batch's jobs that share their formulas and time constants are estimated
  together (`estimate.estimate_many`: the rows `estimate_rows` gives, job by job).
- **Output.** One part per batch of `batch_size` job numbers, `batch-<first>-<last>/rows.parquet`,
  written atomically, with the basic launcher's job ids (`job.job_id`) and job numbers; beside it
  `.hydra/jobs.jsonl`, one line per job: `job_num`, `job_id`, `overrides` and the resolved `config`
  (Hydra's per-job `.hydra/` in one file; the sweep's `multirun.yaml` has Hydra's own settings).
- **Rows already written** (by this launcher or the basic one) are found by job id: with
  `resume=true` a job whose rows are all ok is skipped; a job that runs again writes its rows where
  they are (that part is rewritten without its old rows), so every job is in one part only.

Jobs with a measurement (measure.backend other than none) run one by one exactly as the basic
launcher runs them: a full composition, `.hydra/`, `job.run_job` (isolation, timeouts, resume).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.nodes import AnyNode

from memsweep.app import job
from memsweep.app.cli import grid_of
from memsweep.estimate import estimate_many
from memsweep.results import (
    BATCH_PREFIX, BATCH_RECORD, PART_NAME, OutputError, clean_stale_temps, frame, held_rows, merge_part,
    write_parquet_atomic, write_text_atomic,
)

log = logging.getLogger(__name__)

REPORTED_LINES = 20
"""Per launch, the skipped (resume) and failed jobs named one line each; the rest are counted."""


# --- configurations ----------------------------------------------------------------------------

@dataclass
class Planned:
    """One job of the sweep: its overrides, and how its configuration is built."""

    overrides: list[str]
    group: tuple[str, ...] | None
    """The overrides composed once for every job that shares them; None: composed in full, alone."""
    values: list[tuple[tuple[str, ...], Any]] = field(default_factory=list)
    """The value overrides applied to a copy of the group's configuration: (key path, value)."""
    analytic: bool = False
    task: list[str] = field(default_factory=list)
    """Its task overrides (without hydra.*): the `overrides` column."""


@dataclass
class Group:
    cfg: DictConfig
    """Hydra's composition of the group's overrides (hydra node included)."""
    data: bytes | None
    """Its task configuration as plain data (pickled, copied per job); None when it holds what plain
    data cannot stand for (an interpolation, a typed or read-only node): its jobs are composed alone."""
    choices: dict[str, str]


@dataclass
class Plan:
    overrides: list[list[str]]
    jobs: list[Planned]
    groups: dict[tuple[str, ...], Group]

    def config(self, p: Planned) -> dict[str, Any] | None:
        """A job's resolved task configuration, as plain data (None: it is composed alone)."""
        if p.group is None:
            return None
        data = self.groups[p.group].data
        if data is None:
            return None
        cfg = pickle.loads(data)
        return cfg if all(_apply(cfg, path, value) for path, value in p.values) else None


def _primitive(value: Any) -> bool:
    if isinstance(value, str):
        return "${" not in value and value != "???"
    return value is None or isinstance(value, (bool, int, float))


def _plain_value(value: Any) -> bool:
    """A value plain data holds exactly as OmegaConf would: a primitive or a flat list of them."""
    if isinstance(value, list):
        return all(_primitive(v) for v in value)
    return _primitive(value)


def _plain_node(node: Any) -> bool:
    """A config node that converts to plain data and back without loss: untyped, no
    interpolation, nothing missing, nothing read-only."""
    if node._is_interpolation() or node._is_missing() or node._get_flag("readonly"):
        return False
    if isinstance(node, DictConfig):
        return not node._is_none() and all(isinstance(k, str) and _plain_node(node._get_node(k)) for k in node.keys())
    if isinstance(node, ListConfig):
        return not node._is_none() and all(_plain_node(node._get_node(i)) for i in range(len(node)))
    return type(node) is AnyNode and _primitive(node._value())


def _apply(cfg: dict[str, Any], path: tuple[str, ...], value: Any) -> bool:
    """Hydra's `key=value` on plain data (OmegaConf.update with merge, in struct mode): the key
    must exist; a list replaces. False where only OmegaConf can say what happens (a missing key,
    a mapping replaced or merged, a list made a value): the job is then composed in full."""
    node: Any = cfg
    for key in path[:-1]:
        node = node.get(key) if type(node) is dict else None
    last = path[-1]
    if type(node) is not dict or last not in node or type(node[last]) is dict:
        return False
    if type(value) is list:
        node[last] = list(value)
    elif type(node[last]) is list:
        return False
    else:
        node[last] = value
    return True


def _analytic(cfg: dict[str, Any]) -> bool:
    measure = cfg.get("measure")
    return measure is None or (isinstance(measure, dict) and measure.get("backend", "none") == "none")


def _ours(launcher: Any) -> bool:
    """The batched path knows memsweep's task only; any other Hydra app runs job by job."""
    return getattr(launcher.task_function, "__module__", "").startswith("memsweep.")


def plan(launcher: Any, job_overrides: Sequence[Sequence[str]]) -> Plan:
    """How each job's configuration is built, checked before any job runs: every group is
    composed (Hydra's error if one fails), every job's value overrides applied to a copy; a job
    that needs a full composition gets one (Hydra's error if it fails)."""
    loader = launcher.hydra_context.config_loader
    repository = getattr(loader, "repository", None)
    parser = OverridesParser.create()
    kinds: dict[str, tuple[str, Any]] = {}
    groups: dict[tuple[str, ...], Group] = {}
    out = Plan([list(o) for o in job_overrides], [], groups)
    ours = _ours(launcher) and repository is not None
    for overrides in out.overrides:
        for text in overrides:
            if text not in kinds:
                kinds[text] = _kind(parser.parse_override(text), repository)
        p = Planned(overrides, None, task=[t for t in overrides if kinds[t][0] != "hydra"])
        if ours:
            p.group, p.values = _split(overrides, kinds)
        if p.group is not None and p.group not in groups:
            cfg = loader.load_sweep_config(launcher.config, list(p.group))
            data = None
            if all(_plain_node(cfg._get_node(k)) for k in cfg.keys() if k != "hydra"):
                container = OmegaConf.to_container(cfg, resolve=False)
                container.pop("hydra", None)
                data = pickle.dumps(container, protocol=pickle.HIGHEST_PROTOCOL)
            groups[p.group] = Group(cfg, data, dict(cfg.hydra.runtime.choices))
        cfg = out.config(p) if p.group is not None else None
        if cfg is None:
            p.group = None
            loader.load_sweep_config(launcher.config, list(overrides))  # Hydra's check (and error)
        else:
            p.analytic = _analytic(cfg)
        out.jobs.append(p)
    return out


def _kind(o: Override, repository: Any) -> tuple[str, Any]:
    """What an override is: `hydra` (hydra.*), `group` (a config-group choice), `value` ((key
    path, value): applied to plain data), or `composed` (its key: only a composition applies it,
    `+key=`, `~key`, a dict or an interpolation)."""
    if o.is_hydra_override():
        return "hydra", None
    if o.is_sweep_override() or o.package is not None or repository is None:
        return "composed", o.key_or_group
    value = o.value()
    if repository.group_exists(o.key_or_group) and not isinstance(value, dict):
        return "group", None
    if o.type == OverrideType.CHANGE and "[" not in o.key_or_group and _plain_value(value):
        return "value", (tuple(o.key_or_group.split(".")), value)
    return "composed", o.key_or_group


def _split(overrides: list[str], kinds: dict[str, tuple[str, Any]]
           ) -> tuple[tuple[str, ...] | None, list[tuple[tuple[str, ...], Any]]]:
    """(the overrides a composition applies: hydra.*, group choices and those only a composition
    applies; the plain value overrides). (None, []) where the two touch one key: only Hydra's
    order of application says what that job is."""
    group, values, composed = [], [], []
    for text in overrides:
        kind, what = kinds[text]
        if kind == "value":
            values.append(what)
            continue
        group.append(text)
        if kind == "composed":
            composed.append(what)
    for key in composed:
        for path, _ in values:
            dotted = ".".join(path)
            if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
                return None, []
    return tuple(group), values


# --- where rows go --------------------------------------------------------------------------------

@dataclass
class Layout:
    """Where a grid's jobs go: `grid_dir/<job num>/` (the sweep directory, or the grid-<hash>/ of
    a grid added with add=true), and the batches beside them."""

    grid_dir: Path
    job_dirs: bool
    """`grid_dir/<num>` is each job's own directory (hydra.sweep.subdir ends in ${hydra.job.num});
    otherwise parts are looked for anywhere under the sweep directory."""

    @classmethod
    def of(cls, config: DictConfig) -> Layout:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir", ""))
        m = re.fullmatch(r"(?:(.*)/)?\$\{hydra\.job\.num\}", subdir)
        if m and "${" not in (m.group(1) or ""):
            return cls(sweep_dir / (m.group(1) or ""), True)
        return cls(sweep_dir, False)

    def parts(self) -> list[Path]:
        return sorted(self.grid_dir.glob(f"*/{PART_NAME}") if self.job_dirs else self.grid_dir.rglob(PART_NAME))

    def own_dir(self, num: int) -> Path | None:
        """A job's own directory when a run of it on its own left one (a killed basic sweep)."""
        d = self.grid_dir / str(num)
        return d if self.job_dirs and (d / ".hydra").is_dir() else None


# --- running -------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One analytic job of a batch, from configuration to rows."""

    k: int
    """Its place in the launch."""
    num: int
    planned: Planned
    cfg: dict[str, Any]
    jid: str
    choices: dict[str, str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    code: int = 0
    message: str = ""

    def fail(self, code: int, message: str) -> None:
        self.code, self.message = code, message
        self.rows = [job.error_row(OmegaConf.create(self.cfg), self.choices, message)]


class Reporter:
    """The console lines of skipped and failed jobs: the first REPORTED_LINES one each, then a count."""

    def __init__(self) -> None:
        self.lines = 0
        self.skipped_more = 0
        self.failed_more = 0

    def skipped(self, num: int) -> None:
        if self.lines < REPORTED_LINES:
            self.lines += 1
            print(f"[job {num}] resume: rows exist, skipped", flush=True)
        else:
            self.skipped_more += 1

    def failed(self, num: int, message: str) -> None:
        if self.lines < REPORTED_LINES:
            self.lines += 1
            print(f"error: job {num}: {message}", file=sys.stderr)
        else:
            self.failed_more += 1

    def close(self) -> None:
        if self.skipped_more:
            print(f"resume: {self.skipped_more} more job(s) skipped, their rows exist", flush=True)
        if self.failed_more:
            print(f"error: {self.failed_more} more job(s) failed; their rows say why", file=sys.stderr)


def _evaluate(entries: list[Entry]) -> None:
    """Each entry's rows, as `job.run_job` makes them: `job.prepare` (the formulas and time
    constants built once per distinct key), then the estimates of every entry that shares
    formulas and constants at once (`estimate_many`, which `estimate_rows` is for one job)."""
    cache: dict[Any, Any] = {}
    together: dict[tuple[int, int], list[tuple[Entry, job.Prepared]]] = {}
    for e in entries:
        try:
            ready = job.prepare(e.cfg, cache)
            together.setdefault((id(ready.formulas), id(ready.time)), []).append((e, ready))
        except Exception as exc:  # noqa: BLE001 (each becomes the job's error row)
            e.fail(*job.failure(exc, e.num))
    for members in together.values():
        first = members[0][1]
        results = estimate_many([ready.spec for _, ready in members], first.formulas, first.time)
        for (e, _), got in zip(members, results):
            if isinstance(got, Exception):
                e.fail(*job.failure(got, e.num))
            else:
                e.rows = got


def _frame(entries: list[Entry], meta: dict[str, Any]) -> pl.DataFrame:
    """The batch's rows; a job whose rows no column can hold leaves one error row saying why."""
    def with_meta(e: Entry) -> list[dict[str, Any]]:
        m = {**meta, "job_num": e.num, "job_id": e.jid, "overrides": json.dumps(grid_of(e.planned.task))}
        return [{**r, **m} for r in e.rows]

    try:
        return frame([r for e in entries for r in with_meta(e)])
    except Exception:  # noqa: BLE001 (find the job, as job._write_rows does for its own)
        frames = []
        for e in entries:
            try:
                frames.append(frame(with_meta(e)))
            except Exception as exc:  # noqa: BLE001
                e.fail(1, f"rows not writable: {type(exc).__name__}: {exc}".splitlines()[0])
                frames.append(frame(with_meta(e)))
        return pl.concat(frames, how="vertical")


def write_record(directory: Path, entries: list[Entry]) -> None:
    """`.hydra/jobs.jsonl`: one line per job (number, id, overrides, resolved configuration); the
    lines of jobs not in `entries` that a record there already has are kept."""
    path = directory / BATCH_RECORD
    ids = {e.jid for e in entries}
    kept: list[str] = []
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("job_id") not in ids]
    lines = [json.dumps({"job_num": e.num, "job_id": e.jid, "overrides": e.planned.task, "config": e.cfg})
             for e in entries]
    lines = sorted(kept + lines, key=lambda line: json.loads(line).get("job_num", 0))
    write_text_atomic("\n".join(lines) + "\n", path)


def _run_batch(entries: list[Entry], target: Path, meta: dict[str, Any], report: Reporter) -> None:
    """Estimate the entries and write their rows into `target`: a batch's part (beside the rows
    it holds of other jobs), or a job's own directory (its part replaced, as the basic launcher
    replaces it)."""
    batch = target.name.startswith(BATCH_PREFIX)
    if batch:
        write_record(target, entries)  # first, as Hydra writes .hydra/ before a job: an interrupted batch shows
    _evaluate(entries)
    try:
        rows = _frame(entries, meta)
        merge_part(rows, target) if batch else write_parquet_atomic(rows, target / PART_NAME)
    except OutputError as exc:  # the directory cannot take the part: each job's error, as job.run_job
        for e in entries:
            e.code, e.message = 1, str(exc.strerror)
    for e in entries:
        if e.code:
            report.failed(e.num, e.message)


def _returned(overrides: list[str], code: int) -> JobReturn:
    try:
        name = JobRuntime.instance().get("name")
    except KeyError:
        name = None
    ret = JobReturn(overrides=overrides, working_dir=os.getcwd(), task_name=name, status=JobStatus.COMPLETED)
    ret.return_value = code
    return ret


@contextlib.contextmanager
def _progress(enabled: bool | None, total: int) -> Iterator[Any]:
    """tqdm on stderr: by default only when stderr is a terminal (disable=None)."""
    from tqdm import tqdm

    disable = None if enabled is None else not enabled
    with tqdm(total=total, unit="job", file=sys.stderr, disable=disable, dynamic_ncols=True,
              smoothing=0.1) as bar:
        yield bar


def _run_together(launcher: Any, planned: Plan, ks: list[int], nums: list[int], returns: list[Any],
                  report: Reporter, bar: Any) -> None:
    """The analytic jobs, a batch of job numbers at a time."""
    config = launcher.config
    layout = Layout.of(config)
    clean_stale_temps(layout.grid_dir)
    held = held_rows(layout.parts())
    size = max(1, int(launcher.batch_size))
    end = max(nums) + 1
    meta = {"sweep_id": job.sweep_id(Path(str(config.hydra.sweep.dir)))}
    batches: dict[int, list[int]] = {}
    for k in ks:
        batches.setdefault(nums[k] // size, []).append(k)
    for b, members in batches.items():
        first, last = b * size, min((b + 1) * size, end) - 1
        name = f"{BATCH_PREFIX}{first}-{last}"
        log.info(f"\t#{first}-{last} : {len(members)} job(s) -> {name}")
        targets: dict[Path, list[Entry]] = {}
        for k in members:
            p = planned.jobs[k]
            cfg = planned.config(p)
            assert cfg is not None and p.group is not None  # planned so
            e = Entry(k, nums[k], p, cfg, job.job_id(cfg), planned.groups[p.group].choices)
            h = held.get(e.jid)
            if h is not None and h.done and cfg.get("resume") is True:
                report.skipped(e.num)
                returns[k] = _returned(p.overrides, 0)
                continue
            target = h.part.parent if h is not None else (layout.own_dir(e.num) or layout.grid_dir / name)
            targets.setdefault(target, []).append(e)
        for target, entries in targets.items():
            _run_batch(entries, target, meta, report)
            for e in entries:
                returns[e.k] = _returned(e.planned.overrides, e.code)
        bar.update(len(members))


def _run_alone(launcher: Any, overrides: list[str], num: int) -> JobReturn:
    """One job exactly as Hydra's basic launcher runs it."""
    config, ctx = launcher.config, launcher.hydra_context
    log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
    sweep_config = ctx.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = num
        sweep_config.hydra.job.num = num
    ret = run_job(hydra_context=ctx, task_function=launcher.task_function, config=sweep_config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return ret


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    planned = launcher.planned
    if planned is None or planned.overrides != [list(o) for o in job_overrides]:
        planned = plan(launcher, job_overrides)  # the sweeper did not check this batch through us
    launcher.planned = None
    n = len(planned.jobs)
    nums = [initial_job_idx + k for k in range(n)]
    together = [k for k, p in enumerate(planned.jobs) if p.group is not None and p.analytic]
    alone = sorted(set(range(n)) - set(together))
    log.info(f"Launching {n} jobs: {len(together)} analytic, estimated together in batches of "
             f"{launcher.batch_size}; {len(alone)} one by one")
    returns: list[Any] = [None] * n
    report = Reporter()
    try:
        with _progress(launcher.progress, n) as bar:
            if together:
                _run_together(launcher, planned, together, nums, returns, report, bar)
            for k in alone:
                returns[k] = _run_alone(launcher, planned.jobs[k].overrides, nums[k])
                bar.update(1)
    finally:
        report.close()
    return returns
