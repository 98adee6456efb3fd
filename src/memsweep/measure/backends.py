"""Measurement backends: `fake` (FakeTensorMode on the CPU), `cpu` (a real run), `cuda` (a GPU).

`measure(spec)` never raises for an expected failure: out of memory becomes status=oom, a
configuration the reference models cannot run becomes status=skipped, anything else status=error,
each with a one-line message. GPU memory is released before it returns, so a sweep goes on.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memsweep.columns import Columns
from memsweep.formulas import FORMULAS
from memsweep.measure.autocast import cuda_policy
from memsweep.measure.parallel import traced_rank
from memsweep.measure.sdpa import cuda_sdpa, observe_sdpa
from memsweep.measure.timing import TIMED_PHASES, CudaEventTimer, PerfCounterTimer, Timings, timed_steps
from memsweep.measure.tracker import StorageTracker
from memsweep.measure.workloads import Prepared, Unmeasurable, prepare
from memsweep.specs import JobSpec
from memsweep.units import GIB

PHASES = ("forward", "backward", "optimizer", "prefill", "decode")


@dataclass
class Measurement:
    backend: str
    status: str = "ok"
    error: str | None = None
    peak_bytes: int | None = None
    reserved_bytes: int | None = None
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    phase_times: dict[str, float] = field(default_factory=dict)
    """Median seconds of each timed phase (measure/timing.py: forward, backward, optimizer per
    optimizer step; prefill; decode_token per generated token); empty when untimed (fake)."""
    breakdown: dict[str, int] = field(default_factory=dict)
    phase_peaks: dict[str, int] = field(default_factory=dict)
    phase_breakdowns: dict[str, dict[str, int]] = field(default_factory=dict)
    device: str | None = None
    wall_s: float = 0.0
    params: int | None = None
    """Parameters of the measured model (a LoRA model's frozen base only), and those trained: the
    counts of a row no formula models, whose spec cannot count them (`parameter_counts`)."""
    trainable_params: int | None = None
    attn_kernel: str | None = None
    """The SDPA kernels the measured run used, most calls first ("cudnn", "flash+math"): fake picks
    them as CUDA would on the job's GPU (measure/sdpa.py), cpu and cuda record their device's pick."""

    def row_fields(self) -> dict[str, Any]:
        """The measured columns of a result row."""
        fields = {
            "measure_backend": self.backend,
            "measured_peak_bytes": self.peak_bytes,
            "measured_reserved_bytes": self.reserved_bytes,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "device": self.device,
            "torch_version": torch.__version__,
            "measure_wall_s": self.wall_s,
            "measured_attn_kernel": self.attn_kernel,
        }
        for cat in ("weights", "gradients", "optimizer", "activations", "kv_cache"):
            fields[f"measured_{cat}_bytes"] = self.breakdown.get(cat)
        for phase in PHASES:
            fields[f"measured_{phase}_peak_bytes"] = self.phase_peaks.get(phase)
        for phase in TIMED_PHASES:
            fields[f"measured_{phase}_s"] = self.phase_times.get(phase)
        return fields


def prepare_for(spec: JobSpec):
    """The step builder of `measure.impl`: memsweep's reference models, transformers' or torchtune's."""
    if spec.measure.impl == "hf":
        from memsweep.measure.hf import prepare_hf

        return prepare_hf
    if spec.measure.impl == "torchtune":
        from memsweep.measure.torchtune import prepare_torchtune

        return prepare_torchtune
    return prepare


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def measure(spec: JobSpec) -> Measurement:
    backend = spec.measure.backend
    started = time.perf_counter()
    try:
        torch.manual_seed(spec.measure.seed)
        run = {"fake": _fake, "cpu": _cpu, "cuda": _cuda}[backend]
        result = run(spec)
    except Unmeasurable as exc:
        result = Measurement(backend=backend, status="skipped", error=f"measure={backend}: {exc}")
    except torch.OutOfMemoryError as exc:
        result = Measurement(backend=backend, status="oom", error=_one_line(exc))
    except Exception as exc:
        result = Measurement(backend=backend, status="error", error=f"measure={backend}: {_one_line(exc)}")
    finally:
        gc.collect()  # drop the model, optimizer and any traceback-held tensors
        if backend == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
    result.wall_s = time.perf_counter() - started
    return result


def _tracked_steps(spec: JobSpec, device: str, timed: bool, sdpa: observe_sdpa | cuda_sdpa
                   ) -> tuple[StorageTracker, Timings | None, Prepared]:
    """Build, run the warm-up steps (untimed), then the measured ones, all under a storage tracker
    and `sdpa` (which picks or records the attention kernels); timed ones phase by phase with
    perf_counter (so cpu times include the tracker's per-op cost). Untimed (fake) runs decode only
    the last token: the same peak (see `prepare`)."""
    tracker = StorageTracker()
    with (cuda_policy() if device == "cpu" else contextlib.nullcontext(), tracker, sdpa,
          traced_rank(spec, tracker)):
        prepared = prepare_for(spec)(spec, device, tracker, last_decode_only=not timed)
        for _ in range(spec.measure.warmup):
            prepared.step()
        tracker.reset_peak()
        timings = None
        if timed:
            timings = timed_steps(prepared, PerfCounterTimer(), spec.measure.repeats)
        else:
            prepared.step()
    return tracker, timings, prepared


def parameter_counts(spec: JobSpec, model: torch.nn.Module) -> tuple[int, int]:
    """(params, trainable_params) as result rows count them: a LoRA model's params are its frozen
    base, its adapters the trainable ones; inference trains nothing. Tied weights count once."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if spec.workload.training else 0
    return (total - trainable if spec.workload.kind == "lora" else total), trainable


def _from_tracker(backend: str, tracker: StorageTracker, device: str, spec: JobSpec,
                  prepared: Prepared, sdpa: observe_sdpa | cuda_sdpa) -> Measurement:
    params, trainable = parameter_counts(spec, prepared.model)
    return Measurement(backend=backend, peak_bytes=tracker.peak.total, attn_kernel=sdpa.summary(),
                       breakdown=dict(tracker.peak.by_category),
                       phase_peaks=dict(tracker.phase_peaks),
                       phase_breakdowns=dict(tracker.phase_breakdowns), device=device,
                       params=params, trainable_params=trainable)


FAKE_LOGGER = "torch._subclasses.fake_tensor"
"""Logs every failing meta kernel with its traceback at ERROR (a dozen lines per failure, on
stderr); the job's row already says what failed, in one line."""


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fake(spec: JobSpec) -> Measurement:
    # Fake tensors on the *cpu* device: fake cuda tensors and the meta device cannot run the
    # backward pass on a CPU-only torch and fall back to math attention.
    # SDPA runs the kernel CUDA would pick on the job's GPU, not the CPU's (measure/sdpa.py),
    # unless measure.sdpa=device
    gpu = spec.measure.sdpa == "gpu"
    sdpa = cuda_sdpa(spec.hardware.capability) if gpu else observe_sdpa()
    with _quiet(FAKE_LOGGER), FakeTensorMode():
        tracker, _, prepared = _tracked_steps(spec, "cpu", timed=False, sdpa=sdpa)
        return _from_tracker("fake", tracker, "fake:cpu", spec, prepared, sdpa)


def _cpu(spec: JobSpec) -> Measurement:
    limit = spec.measure.max_gib
    if limit is not None and not spec.model.unmodelled:  # unmodelled: no estimate (measure.max_rss_gib guards)
        estimate = float(FORMULAS["detailed"](Columns.from_specs([spec])).total[0])
        if estimate > limit * GIB:
            raise Unmeasurable(f"detailed estimate {estimate / GIB:.2f} GiB > measure.max_gib={limit}")
    sdpa = observe_sdpa()
    tracker, timings, prepared = _tracked_steps(spec, "cpu", timed=True, sdpa=sdpa)
    m = _from_tracker("cpu", tracker, "cpu", spec, prepared, sdpa)
    m.step_time_s, m.phase_times = timings.step_s, timings.phases
    m.tokens_per_s = prepared.tokens_per_step / m.step_time_s
    return m


def _cuda(spec: JobSpec) -> Measurement:
    if not torch.cuda.is_available():
        raise Unmeasurable("no CUDA device is available to this process")
    torch.cuda.empty_cache()
    prepared = prepare_for(spec)(spec, "cuda")
    for _ in range(spec.measure.warmup):
        prepared.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    # each timed step: CUDA events around the step and each phase, one synchronize at its end
    with observe_sdpa() as sdpa:  # records torch's own pick (_fused_sdp_choice) per call
        timings = timed_steps(prepared, CudaEventTimer(), spec.measure.repeats)
    peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    # One more step under the storage tracker gives the breakdown at the tensor level.
    with StorageTracker() as tracker:
        tracker.adopt(prepared.model, prepared.optimizer)
        tracker.reset_peak()
        prepared.tracker = tracker
        prepared.step()
    params, trainable = parameter_counts(spec, prepared.model)
    return Measurement(
        backend="cuda", peak_bytes=peak, reserved_bytes=reserved, step_time_s=timings.step_s,
        tokens_per_s=prepared.tokens_per_step / timings.step_s, phase_times=timings.phases,
        breakdown=dict(tracker.peak.by_category),
        phase_peaks=dict(tracker.phase_peaks), device=torch.cuda.get_device_name(),
        params=params, trainable_params=trainable, attn_kernel=sdpa.summary())


# --- isolation: one child process per measurement ------------------------------------------

FAULT_ENV = "MEMSWEEP_INJECT_FAULT"
"""Test hook: `segfault`, `hang` or `memory` makes the child misbehave that way."""


def _child(spec: JobSpec, conn) -> None:
    import os
    import signal

    fault = os.environ.get(FAULT_ENV)
    if fault == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif fault == "hang":
        time.sleep(3600)
    elif fault == "memory":
        hog = []
        while True:
            hog.append(bytearray(64 * 2**20))
            time.sleep(0.01)
    conn.send(measure(spec))
    conn.close()


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_isolated(spec: JobSpec, poll_s: float = 0.05) -> Measurement:
    """`measure` in a spawned child process, watched for a time and a memory limit. Whatever the
    child does (segfault, CUDA error, hang, runaway memory) the parent returns a Measurement."""
    import multiprocessing as mp
    import signal

    backend, m = spec.measure.backend, spec.measure
    started = time.perf_counter()
    ctx = mp.get_context("spawn")  # never fork a process that may hold a CUDA context
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(spec, child_conn), daemon=True)
    proc.start()
    child_conn.close()
    limit = None if m.max_rss_gib is None else m.max_rss_gib * GIB
    result: Measurement | None = None
    why = ""
    while True:
        if parent_conn.poll(poll_s):
            try:
                result = parent_conn.recv()
            except EOFError:
                why = ""
            break
        if not proc.is_alive():
            break
        elapsed = time.perf_counter() - started
        if m.timeout_s is not None and elapsed > m.timeout_s:
            why = "timeout"
            break
        if limit is not None and _rss_bytes(proc.pid) > limit:
            why = "memory"
            break
    if proc.is_alive():
        proc.kill()
    proc.join(10)
    wall = time.perf_counter() - started
    if result is not None:
        result.wall_s = wall
        return result
    if why == "timeout":
        return Measurement(backend=backend, status="timeout", wall_s=wall,
                           error=f"measure={backend}: no result within measure.timeout_s={m.timeout_s}")
    if why == "memory":
        return Measurement(backend=backend, status="error", wall_s=wall,
                           error=f"measure={backend}: child exceeded measure.max_rss_gib={m.max_rss_gib}")
    code = proc.exitcode
    how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    return Measurement(backend=backend, status="error", wall_s=wall,
                       error=f"measure={backend}: the measuring process died ({how})")
