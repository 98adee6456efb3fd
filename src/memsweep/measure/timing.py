"""Phase timers: how long each phase of a measured step takes, the same phase logic on every device.

A workload wraps each phase in `timer.phase(name)` (workloads.py: forward, backward, optimizer;
prefill, one `decode_token` per generated token); the backend wraps the whole step in
`phase("step")`. A timer only marks instants while the step runs and reads the spans once the
step is over, so timing never adds a synchronisation inside the step:

- `PerfCounterTimer` (measure=cpu): `time.perf_counter()` marks; CPU ops are synchronous.
- `CudaEventTimer` (measure=cuda): a `torch.cuda.Event(enable_timing=True)` recorded on the
  current stream at each mark, one `torch.cuda.synchronize()` at the end of the step, then
  `elapsed_time` between each pair: GPU time, whatever the host ran ahead. Backward kernels
  (recomputation and in-backward optimizer steps included) run on the stream of their forward
  ops, so the end mark recorded after `backward()` returns follows them.
- `NoTimer`: warm-up steps, fake tensors and the cuda backend's tracked step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

STEP = "step"
SUMMED = ("forward", "backward", "optimizer", "prefill")
"""Phases summed within a step (a training step's micro-batches each run forward and backward),
then the median over the timed steps."""
PER_TOKEN = "decode_token"
"""Timed once per decoded token: the median over every token of every timed step."""
TIMED_PHASES = (*SUMMED, PER_TOKEN)


class NoTimer:
    """Times nothing (warm-up and untimed steps)."""

    current: str | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


NO_TIMER = NoTimer()


class PhaseTimer:
    """Spans of named phases within one step; a subclass says how an instant is marked."""

    def __init__(self) -> None:
        self._open: list[str] = []
        self._spans: list[tuple[str, Any, Any]] = []

    @property
    def current(self) -> str | None:
        """The innermost phase open now (tests check where work lands: recompute in backward)."""
        return self._open[-1] if self._open else None

    def start_step(self) -> None:
        self._spans = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._open.append(name)
        begin = self._mark()
        try:
            yield
        finally:
            self._open.pop()
        self._spans.append((name, begin, self._mark()))  # not reached when the step raised

    def end_step(self) -> dict[str, list[float]]:
        """Seconds of every span of this step, by phase, in the order they ended."""
        self._settle()
        out: dict[str, list[float]] = {}
        for name, begin, end in self._spans:
            out.setdefault(name, []).append(self._seconds(begin, end))
        self._spans = []
        return out

    def _mark(self) -> Any:
        raise NotImplementedError

    def _settle(self) -> None:
        """Wait until every marked instant has happened."""

    def _seconds(self, begin: Any, end: Any) -> float:
        raise NotImplementedError


class PerfCounterTimer(PhaseTimer):
    def _mark(self) -> float:
        return time.perf_counter()

    def _seconds(self, begin: float, end: float) -> float:
        return end - begin


class CudaEventTimer(PhaseTimer):
    def _mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # on the current stream, asynchronously
        return event

    def _settle(self) -> None:
        torch.cuda.synchronize()

    def _seconds(self, begin: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return begin.elapsed_time(end) / 1000.0  # milliseconds


@dataclass
class Timings:
    """The timed steps, reduced: the whole step's median and each phase's (see SUMMED, PER_TOKEN)."""

    step_s: float
    phases: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, steps: list[dict[str, list[float]]]) -> Timings:
        phases = {name: statistics.median(sum(s[name]) for s in steps)
                  for name in SUMMED if all(name in s for s in steps)}
        tokens = [t for s in steps for t in s.get(PER_TOKEN, ())]
        if tokens:
            phases[PER_TOKEN] = statistics.median(tokens)
        return cls(step_s=statistics.median(s[STEP][0] for s in steps), phases=phases)


def timed_steps(prepared, timer: PhaseTimer, repeats: int) -> Timings:
    """Run `repeats` steps of a `Prepared` (workloads.py) under `timer`, each a `step` span around
    its phases; the timer is detached afterwards, so later steps run untimed."""
    prepared.timer = timer
    steps = []
    try:
        for _ in range(repeats):
            timer.start_step()
            with timer.phase(STEP):
                prepared.step()
            steps.append(timer.end_step())
    finally:
        prepared.timer = NO_TIMER
    return Timings.of(steps)
