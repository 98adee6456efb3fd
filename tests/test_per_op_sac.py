"""recompute=op: torchtitan's per-op selective activation checkpointing (issue 30's torchtitan runs).

The reference checkpoints each block with torch's selective-checkpoint policy as torchtitan writes
it (measure/models.per_op_sac_context); `detailed` models what it keeps (formulas/sac.py). The
trace is the truth here: every phase peak of `detailed` against `measure=fake` on cut presets at
their real vocabularies (the loss and a block's re-run are the moments a user meets)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from memsweep.columns import Columns
from memsweep.errors import ConfigError
from memsweep.formulas.detailed import phase_peaks, sdpa_kernel
from memsweep.formulas.sac import sac_total_bytes
from memsweep.presets import job_spec, load_preset, model_spec
from memsweep.specs import KernelsSpec, MeasureSpec, OffloadSpec

CASES = [
    ("llama3.2-1b", "train", "mixed", "eager"),
    ("llama3.2-1b", "lora", "pure", "eager"),
    ("llama3.2-1b", "qlora", "mixed", "eager"),
    ("qwen2.5-0.5b", "train", "mixed", "eager"),  # q/k/v biases: addmm, not kept
    ("gemma-2-2b", "lora", "mixed", "eager"),
    ("qwen3-30b-a3b", "lora", "mixed", "eager"),  # the router's mm; the experts' bmm is not kept
    ("deepseek-v3", "lora", "mixed", "eager"),  # MLA's q_a / q_b / kv_a / kv_b
    ("gpt2", "train", "mixed", "eager"),  # every linear has a bias: SDPA's output alone
    ("llama3.2-1b", "train", "pure", "liger"),
    ("llama3.2-1b", "train", "mixed", "compile"),
]


def _spec(name: str, wl: str, precision: str, kernels: str, recompute: str = "op", layers: int = 2):
    m = model_spec(name)
    m = dataclasses.replace(m, layers=min(m.layers, layers + (m.dense_layers if m.experts else 0)))
    return job_spec(m, wl=wl, measure=MeasureSpec("fake", "fake"), seq=1024, batch=2, precision=precision,
                    recompute=recompute, kernels=KernelsSpec(**load_preset("kernels", kernels)))


def _traced_as_detailed_says(spec):
    """The fake trace of `spec`, every phase peak within 0.5 % of `detailed`'s."""
    from memsweep.measure.backends import measure

    m = measure(spec)
    assert m.status == "ok", m.error
    est = phase_peaks(Columns.from_specs([spec]))
    for phase, traced in m.phase_peaks.items():
        if phase in est:
            assert float(est[phase][0]) == pytest.approx(traced, rel=5e-3), phase
    return m


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_detailed_equals_the_trace_of_torchtitans_policy(case):
    pytest.importorskip("torch")
    from memsweep.measure.backends import measure

    spec = _spec(*case)
    m = _traced_as_detailed_says(spec)
    # it keeps more than full recompute: the forward's end holds every block's kept outputs
    full = measure(dataclasses.replace(spec, recompute="full"))
    assert m.phase_peaks["forward"] > full.phase_peaks["forward"]


def test_kept_outputs_follow_the_matmul_parity():
    """Llama's block runs q k v o gate up down as seven `aten.mm`: q, v, gate and down are kept
    (1st, 3rd, 5th, 7th), with the fused SDPA call's output and log-sum-exp; with a bias on q, k, v
    (Qwen2) those three are addmm and the count starts at o: o and up are kept."""
    llama = Columns.from_specs([_spec("llama3.2-1b", "train", "pure", "eager")])
    qwen = Columns.from_specs([_spec("qwen2.5-0.5b", "train", "pure", "eager")])
    for c, widths in ((llama, lambda c: c.heads * c.head_dim + c.kv_heads * c.head_dim + c.ffn + c.hidden),
                      (qwen, lambda c: c.hidden + c.ffn)):
        kernel = sdpa_kernel(c)
        total, last, tail = sac_total_bytes(c, kernel, np.full(1, 2.0), np.full(1, 2.0), c.v_head_dim)
        t = c.batch * c.seq
        queries = np.ceil(c.seq / 32.0) * 32.0 if kernel[0] == 2 else c.seq  # memory-efficient pads
        attention = t * c.heads * c.head_dim * 2.0 + c.batch * c.heads * queries * 4.0
        assert last[0] == pytest.approx((t * widths(c) * 2.0 + attention)[0])
        assert total[0] == pytest.approx(c.layers[0] * last[0])
    # llama's last mm (down, the 7th) is kept and not re-run (its inputs are saved before it runs)
    assert sac_total_bytes(llama, sdpa_kernel(llama), np.full(1, 2.0), np.full(1, 2.0), llama.v_head_dim)[2][0] > 0
    # qwen's down is the 4th mm: not kept
    assert sac_total_bytes(qwen, sdpa_kernel(qwen), np.full(1, 2.0), np.full(1, 2.0), qwen.v_head_dim)[2][0] == 0


def test_recompute_op_is_a_key_with_its_limits():
    spec = _spec("llama3.2-1b", "train", "mixed", "eager")
    assert spec.recompute == "op"
    with pytest.raises(ConfigError, match="recompute"):
        _spec("llama3.2-1b", "train", "mixed", "eager", recompute="per_op")
    with pytest.raises(ConfigError, match="offload.activations"):
        dataclasses.replace(spec, offload=OffloadSpec(activations=True)).validate()
    # inference has nothing to recompute: the same estimate as recompute=none
    inf = [job_spec(model_spec("llama3.2-1b"), wl="inference", seq=512, batch=1, recompute=r) for r in ("none", "op")]
    totals = phase_peaks(Columns.from_specs(inf))
    for phase in ("prefill", "decode"):
        assert totals[phase][0] == totals[phase][1] > 0


def test_op_sits_between_selective_and_full_at_a_real_size():
    """Llama-3-8B, seq 8192, batch 2, bf16 (torchtitan's Table 1 shape): op keeps more than full
    recompute and less than none; the planner ranks it between selective and full by compute."""
    from memsweep.plan.cases import Variant

    specs = [job_spec(model_spec("llama3-8b"), wl="train", seq=8192, batch=2, precision="pure", recompute=r)
             for r in ("none", "selective", "op", "full")]
    from memsweep.formulas import FORMULAS

    none, selective, op, full = FORMULAS["detailed"](Columns.from_specs(specs)).total
    assert full < op < selective <= none  # (with a fused SDPA kernel selective keeps what none keeps)
    ranks = [Variant(r).cost for r in ("none", "selective", "op", "full")]
    assert ranks == sorted(ranks)
    assert Variant("op").label == "op"


def test_torchtune_refuses_op_in_one_line():
    pytest.importorskip("torchtune")
    from memsweep.measure.backends import measure

    spec = dataclasses.replace(_spec("llama3.2-1b", "train", "pure", "eager"),
                               measure=MeasureSpec("fake", "fake", impl="torchtune"))
    m = measure(spec)
    assert m.status != "ok" and "recompute=op" in m.error and "\n" not in m.error


def test_transformers_own_checkpointing_takes_the_policy():
    """measure.impl=hf: transformers' gradient checkpointing passes its kwargs to torch's checkpoint,
    so the policy runs on its LlamaDecoderLayer; `detailed` matches that trace too."""
    pytest.importorskip("transformers")
    _traced_as_detailed_says(dataclasses.replace(_spec("llama3.2-1b", "train", "mixed", "eager"),
                                                 measure=MeasureSpec("fake", "fake", impl="hf")))


def test_the_planner_takes_op_where_it_is_the_cheapest_recompute_that_fits():
    """Llama-3.2-3B LoRA at 8,192 tokens on an A100-40GB: selective does not fit one GPU, op does
    (the answer names it, not full); without op in the list the plan falls back to full."""
    from memsweep.estimate import capacity_bytes
    from memsweep.formulas import FORMULAS
    from memsweep.plan.ask import answer, parse_args

    base = ["model=llama3.2-3b", "hardware=a100-40g", "workload=lora", "seq=8192"]
    assert "fits on 1 GPU, recompute=op" in answer(parse_args(base + ["recompute=[none,selective,op,full]"]))
    assert "fits on 1 GPU, recompute=full" in answer(parse_args(base))
    specs = [job_spec(model_spec("llama3.2-3b"), wl="lora", seq=8192, batch=1, hardware="a100-40g", recompute=r)
             for r in ("selective", "op")]
    totals = FORMULAS["detailed"](Columns.from_specs(specs)).total
    assert totals[1] <= capacity_bytes(specs[1]) < totals[0]
