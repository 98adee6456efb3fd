"""Each phase of a measured step timed on its own (issue 15): forward, backward, optimizer; prefill,
decode per token. The cpu backend runs the same phase logic as cuda (measure/timing.py), with
perf_counter instead of CUDA events; the cuda tests run only where a GPU is."""

from __future__ import annotations

import polars as pl
import pytest
from conftest import job, workload

torch = pytest.importorskip("torch")

from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

from memsweep.estimate import estimate_rows  # noqa: E402
from memsweep.formulas import FORMULAS  # noqa: E402
from memsweep.measure.backends import Measurement, measure  # noqa: E402
from memsweep.measure.timing import PerfCounterTimer, Timings, timed_steps  # noqa: E402
from memsweep.measure.workloads import prepare  # noqa: E402
from memsweep.presets import load_preset  # noqa: E402
from memsweep.results import PART_NAME, SCHEMA, collect, frame, write_part  # noqa: E402
from memsweep.specs import MeasureSpec, OptimizerSpec  # noqa: E402

TIME_COLUMNS = ["measured_forward_s", "measured_backward_s", "measured_optimizer_s",
                "measured_prefill_s", "measured_decode_token_s"]
TRAINING = TIME_COLUMNS[:3]
INFERENCE = TIME_COLUMNS[3:]
GEN = 6
LORA = workload("lora", lora_rank=4, lora_targets=("q", "v"))
CASES = {
    "train": (dict(), TRAINING),
    "lora": (dict(wl=LORA), TRAINING),
    "inference": (dict(wl=workload("inference", gen_tokens=GEN)), INFERENCE),
}
ADAMW_IN_BACKWARD = OptimizerSpec(**{**load_preset("optimizer", "adamw"), "in_backward": True})


def tiny(backend: str, repeats: int = 2, **top):
    return job("tiny", seq=32, batch=2, measure=MeasureSpec(backend, backend, warmup=1, repeats=repeats), **top)


def times(m: Measurement) -> dict[str, float | None]:
    fields = m.row_fields()
    return {c: fields[c] for c in TIME_COLUMNS}


def phase_sum(m: Measurement) -> float:
    """The step rebuilt from its phases: decode is timed per token, GEN of them."""
    t = m.phase_times
    return (t.get("forward", 0) + t.get("backward", 0) + t.get("optimizer", 0)
            + t.get("prefill", 0) + GEN * t.get("decode_token", 0))


@pytest.mark.parametrize("case", CASES)
def test_cpu_times_each_phase_of_its_workload(case):
    top, present = CASES[case]
    m = measure(tiny("cpu", **top))
    assert m.status == "ok", m.error
    got = times(m)
    assert all(got[c] > 0 for c in present), got
    assert all(got[c] is None for c in TIME_COLUMNS if c not in present), got
    assert m.step_time_s > 0 and m.tokens_per_s > 0


def test_fake_times_nothing():
    m = measure(tiny("fake", wl=workload("inference", gen_tokens=GEN)))
    assert m.status == "ok" and m.peak_bytes > 0
    assert set(times(m).values()) == {None} and m.step_time_s is None


COVER = 0.95
"""The share of a step its phase spans cover when nothing else runs: they miss only the gaps
between them. The best of a few steps is checked, so a preemption on a loaded machine (CI's two
workers on two cores) does not fail a test of what is timed where."""


def covered(step: dict[str, list[float]]) -> float:
    """The share of one step's span its phases' spans cover (forward and backward summed over
    micro-batches, decode over tokens)."""
    return sum(sum(v) for name, v in step.items() if name != "step") / step["step"][0]


def test_training_phases_add_up_to_the_step():
    # each step: forward and backward spans summed over the micro-batches, and the optimizer's,
    # never more than the step and, at best, all of it but the gaps between them
    spec = tiny("cpu", grad_accum=2)
    prepared, timer = prepare(spec, "cpu"), KeepingTimer()
    prepared.step()  # warm-up: optimizer state exists
    timed_steps(prepared, timer, repeats=4)
    for step in timer.steps:
        assert len(step["forward"]) == len(step["backward"]) == 2 and len(step["optimizer"]) == 1
        assert covered(step) <= 1.0
    assert max(covered(step) for step in timer.steps) >= COVER
    m = measure(tiny("cpu", repeats=1, grad_accum=2))  # the row: the same phases, each > 0
    assert m.status == "ok", m.error
    assert 0 < phase_sum(m) <= m.step_time_s


class KeepingTimer(PerfCounterTimer):
    """Keeps each step's spans (timed_steps hands back only their medians)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict[str, list[float]]] = []

    def end_step(self) -> dict[str, list[float]]:
        self.steps.append(super().end_step())
        return self.steps[-1]


def test_inference_phases_add_up_to_the_step():
    spec = tiny("cpu", wl=workload("inference", gen_tokens=GEN))
    prepared, timer = prepare(spec, "cpu"), KeepingTimer()
    prepared.step()  # warm-up
    timed = timed_steps(prepared, timer, repeats=4)
    for step in timer.steps:
        assert len(step["prefill"]) == 1 and len(step["decode_token"]) == GEN
        assert covered(step) <= 1.0
    assert max(covered(step) for step in timer.steps) >= COVER
    assert set(timed.phases) == {"prefill", "decode_token"}
    # the row's decode time is a median token's (one slow token moves it little; a sum's check
    # against the step is the spans' above)
    assert timed.phases["prefill"] + timed.phases["decode_token"] < timed.step_s


def phases_seen(spec, hook) -> list[str | None]:
    """The timer's open phase each time `hook(prepared, record)` fires, over one timed step."""
    prepared = prepare(spec, "cpu")
    prepared.step()  # warm-up: optimizer state exists
    timer, seen = PerfCounterTimer(), []
    handles = hook(prepared, lambda *_: seen.append(timer.current))
    timed_steps(prepared, timer, repeats=1)
    for h in handles:
        h.remove()
    return seen


def on_blocks(prepared, record):
    return [b.register_forward_pre_hook(record) for b in prepared.model.blocks]


def on_optimizer_steps(prepared, record):
    return [register_optimizer_step_pre_hook(record)]


def test_recompute_is_timed_as_backward():
    layers = 2  # tiny
    assert phases_seen(tiny("cpu", recompute="none"), on_blocks) == ["forward"] * layers
    assert phases_seen(tiny("cpu", recompute="full"), on_blocks) == ["forward"] * layers + ["backward"] * layers


def test_an_in_backward_optimizer_is_timed_as_backward():
    assert phases_seen(tiny("cpu"), on_optimizer_steps) == ["optimizer"]
    seen = phases_seen(tiny("cpu", optimizer=ADAMW_IN_BACKWARD), on_optimizer_steps)
    assert len(seen) > 1 and set(seen) == {"backward"}  # one optimizer per parameter, in its hook


def test_timings_sum_micro_batches_and_take_medians():
    steps = [{"step": [1.0], "forward": [0.2, 0.3], "backward": [0.4], "decode_token": [0.1, 0.2]},
             {"step": [3.0], "forward": [0.1, 0.1], "backward": [0.6], "decode_token": [0.3]},
             {"step": [2.0], "forward": [0.4, 0.4], "backward": [0.5]}]
    t = Timings.of(steps)
    assert t.step_s == 2.0
    assert t.phases == pytest.approx({"forward": 0.5, "backward": 0.5, "decode_token": 0.2})


def test_old_parts_without_phase_times_still_collect(tmp_path):
    rows = estimate_rows(tiny("cpu"), list(FORMULAS.values()))
    timed = {"measure_backend": "cpu", "step_time_s": 0.03, "measured_forward_s": 0.01,
             "measured_backward_s": 0.015, "measured_optimizer_s": 0.004}
    write_part([{**r, **timed, "job_id": "new", "job_num": 0} for r in rows], tmp_path / "0")
    old = frame([{**r, "job_id": "old", "job_num": 1, "measure_backend": "cpu", "step_time_s": 0.03}
                 for r in rows]).drop(TIME_COLUMNS).with_columns(schema_version=pl.lit(6, pl.Int64))
    (tmp_path / "1").mkdir()
    old.write_parquet(tmp_path / "1" / PART_NAME)
    got = collect(tmp_path)
    assert not got.skipped and list(got.table.columns) == list(SCHEMA)
    new_rows, old_rows = (got.table.filter(pl.col("job_id") == j) for j in ("new", "old"))
    assert old_rows.height == new_rows.height == len(rows)
    assert old_rows.select(TIME_COLUMNS).null_count().row(0) == (len(rows),) * len(TIME_COLUMNS)
    assert new_rows["measured_backward_s"].to_list() == [0.015] * len(rows)
    assert new_rows["measured_prefill_s"].null_count() == len(rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", [*CASES, "in_backward", "recompute_full"])
def test_cuda_times_each_phase_with_events(case):
    top, present = {"in_backward": (dict(optimizer=ADAMW_IN_BACKWARD), TRAINING),
                    "recompute_full": (dict(recompute="full"), TRAINING)}.get(case) or CASES[case]
    m = measure(tiny("cuda", repeats=3, **top))
    assert m.status == "ok", m.error
    got = times(m)
    assert all(got[c] > 0 for c in present), got
    assert all(got[c] is None for c in TIME_COLUMNS if c not in present), got
    assert phase_sum(m) == pytest.approx(m.step_time_s, rel=0.10)


def test_the_transformers_implementation_times_its_inference_phases_too():
    pytest.importorskip("transformers")
    spec = job("tiny", seq=32, batch=2, wl=workload("inference", gen_tokens=GEN),
               measure=MeasureSpec("cpu", "cpu", impl="hf", warmup=1, repeats=2))
    m = measure(spec)
    assert m.status == "ok", m.error
    got = times(m)
    assert got["measured_prefill_s"] > 0 and got["measured_decode_token_s"] > 0
    assert got["measured_forward_s"] is None
