"""The time model (issue 15, formulas/timing.py): the roofline per phase, each collective's cost,
the bubble, unknown speeds, and the columns a sweep row carries. Hand-computed expectations from
the model's own stated mechanism; the published comparison is scripts/validate_time.py."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from conftest import job, workload

from memsweep.columns import Columns
from memsweep.estimate import estimate_rows
from memsweep.formulas import get_formula
from memsweep.formulas.timing import Speeds, TimeConstants, step_time
from memsweep.formulas.timing import production_work
from memsweep.presets import load_preset
from memsweep.specs import Hardware, Parallel

K = TimeConstants()
H100 = Hardware(**load_preset("hardware", "h100-80g"))


def timed(spec, k: TimeConstants = K, hw: Hardware | None = None):
    cols = Columns.from_specs([spec])
    return cols, production_work(cols), step_time(cols, Speeds.of([hw or spec.hardware], [spec.dtype]), k)


def test_a_large_training_step_is_compute_bound_at_the_stated_efficiency():
    spec = job("llama3-8b", seq=4096, batch=2, hardware="h100-80g")
    _, w, t = timed(spec)
    peak = H100.tflops_bf16 * 1e12
    causal = w.forward_flops + w.backward_flops - (w.attention_flops - w.causal_attention_flops)
    compute = causal / (peak * K.compute_efficiency)
    assert t.forward_s[0] + t.backward_s[0] == pytest.approx(compute[0], rel=1e-9)
    assert 0 < t.mfu[0] <= K.compute_efficiency + 1e-9  # no communication on one GPU: only the step's extras cost
    assert t.comm_s[0] == 0 and t.bubble_s[0] == 0


def test_decoding_one_sequence_is_bandwidth_bound():
    spec = job("llama3-8b", seq=1024, batch=1, wl=workload("inference", gen_tokens=64), hardware="h100-80g")
    _, w, t = timed(spec)
    memory = w.decode_bytes[0] / (H100.hbm_gbs * 1e9 * K.memory_efficiency)
    assert t.decode_s[0] == pytest.approx(memory, rel=1e-9)
    # every decoded token reads the 16-bit weights at least once: 16 GB at 2.68 TB/s ~ 6 ms
    per_token = t.decode_s[0] / 64
    assert 0.005 < per_token < 0.008
    assert t.tokens_per_s[0] == pytest.approx(64 / t.step_s[0])


def test_unknown_speeds_give_no_estimate_but_the_work_is_counted():
    spec = job("gpt2", seq=256)
    bare = Hardware("mygpu", memory_mib=24_000)
    _, _, t = timed(spec, hw=bare)
    assert math.isnan(t.step_s[0]) and math.isnan(t.tokens_per_s[0]) and t.flops[0] > 0
    row = estimate_rows(dataclasses.replace(spec, hardware=bare), [get_formula("detailed")])[0]
    assert row["status"] == "ok" and row["est_step_time_s"] is None and row["flops"] > 0


def test_tensor_parallel_all_reduces_cost_what_a_ring_moves():
    spec = job("llama3-8b", seq=2048, batch=1, hardware="h100-80g", parallel=Parallel("p", tp=2))
    one = job("llama3-8b", seq=2048, batch=1, hardware="h100-80g")
    _, _, t2 = timed(spec)
    _, _, t1 = timed(one)
    # 2 all-reduces per layer in the forward and 2 in the backward, each 2 (t-1)/t of (s, h) bf16
    per = 2 * 0.5 * 2048 * 4096 * 2 / (H100.nvlink_gbs * 1e9 * K.comm_efficiency)
    assert t2.comm_s[0] == pytest.approx(per * 2 * 32 * 2, rel=1e-9)
    assert t2.forward_s[0] == pytest.approx(t1.forward_s[0] / 2, rel=1e-9)  # the work splits over the ranks


def test_data_parallel_collectives_hide_under_compute_unless_the_link_is_slow():
    spec = job("llama3-8b", seq=4096, batch=4, hardware="h100-80g", parallel=Parallel("p", dp=8, zero=3))
    _, _, fast = timed(spec)
    assert fast.comm_s[0] == 0  # NVLink: the all-gathers and reduce-scatters fit under the compute
    slow = dataclasses.replace(H100, name="slow", nvlink_gbs=0.0, pcie_gbs=2.0)
    _, _, t = timed(dataclasses.replace(spec, hardware=slow), hw=slow)
    assert t.comm_s[0] > 0 and t.step_s[0] > fast.step_s[0]
    _, _, hidden = timed(dataclasses.replace(spec, hardware=slow), TimeConstants(dp_overlap=0.0), hw=slow)
    assert hidden.comm_s[0] > t.comm_s[0]  # without overlap every byte is exposed


def test_the_pipeline_bubble_is_pp_minus_one_slots_of_m():
    par = Parallel("p", pp=4)
    spec = job("llama3-8b", seq=2048, batch=1, hardware="h100-80g", parallel=par, grad_accum=8)
    _, _, t = timed(spec)
    assert t.bubble_s[0] == pytest.approx((t.forward_s[0] + t.backward_s[0]) / 8 * 3, rel=1e-9)


def test_recompute_costs_time_and_the_causal_kernel_saves_it():
    base = dict(seq=8192, batch=1, hardware="h100-80g")
    none, full = (timed(job("llama3-8b", recompute=r, **base))[2] for r in ("none", "full"))
    assert 1.2 < full.step_s[0] / none.step_s[0] < 1.45  # about a third more compute (Korthikanti 2022)
    eager = timed(job("llama3-8b", attention="eager", **base))[2]
    assert eager.forward_s[0] > none.forward_s[0]


def test_the_estimate_is_vectorized():
    specs = [job(m, seq=s, batch=b, hardware=h) for m in ("gpt2", "llama3.2-1b") for s in (256, 1024)
             for b in (1, 4) for h in ("a100-80g", "h100-80g")]
    cols = Columns.from_specs(specs)
    many = step_time(cols, Speeds.of([s.hardware for s in specs], [s.dtype for s in specs]))
    for i, s in enumerate(specs):
        one = timed(s)[2]
        assert np.isclose(many.step_s[i], one.step_s[0], rtol=1e-12)


def test_a_sweep_row_carries_the_estimate():
    row = estimate_rows(job("llama3.2-1b", seq=1024, hardware="a100-80g"), [get_formula("detailed")])[0]
    assert row["est_step_time_s"] > 0 and row["est_tokens_per_s"] > 0 and 0 < row["est_mfu"] < 1
    assert row["est_forward_s"] > 0 and row["est_prefill_s"] is None
    assert row["est_step_time_s"] >= row["est_forward_s"] + row["est_backward_s"] + row["est_optimizer_s"] - 1e-12


def test_time_follows_production_kernels_moe_dropless_and_mla_absorbed():
    from memsweep.formulas.work import step_work

    moe = job("mixtral-8x7b", seq=16, batch=1, wl=workload("inference", gen_tokens=8), hardware="h100-80g")
    cols = Columns.from_specs([moe])
    padded, dropless = step_work(cols), production_work(cols)
    # one sequence decoding: the reference runs all 8 experts on padded rows, a dropless kernel 2
    assert dropless.decode_flops[0] < 0.5 * padded.decode_flops[0]
    train = Columns.from_specs([job("mixtral-8x7b", seq=4096, batch=8)])
    assert production_work(train).forward_flops[0] == pytest.approx(step_work(train).forward_flops[0], rel=0.02)


def test_validation_lists_every_published_entry_compared_or_with_its_reason(tmp_path):
    import subprocess
    import sys

    import yaml
    from conftest import REPO

    out = tmp_path / "v.md"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "validate_time.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    for e in yaml.safe_load((REPO / "docs" / "data" / "published_throughput.yaml").read_text()):
        assert f"| {e['id']} |" in text or f"- {e['id']}: " in text, e["id"]
    assert "median ratio" in text and f"report: {out}" in proc.stdout
