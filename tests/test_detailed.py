"""`detailed` v1 is sane: monotone, sharded as documented, vectorized, and counts what seeds miss."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import job

from memsweep.columns import Columns
from memsweep.formulas import FORMULAS, TERMS
from memsweep.formulas.detailed import kv_cache_bytes
from memsweep.specs import Parallel

DETAILED = FORMULAS["detailed"]
CASES = list(itertools.product(
    ("train", "lora", "inference"), ("none", "selective", "full"), ("eager", "sdpa"),
    ("llama3-8b", "bert-large-uncased", "gpt2")))


def totals(specs) -> np.ndarray:
    return DETAILED(Columns.from_specs(specs)).total


@pytest.mark.parametrize("wl,recompute,attention,name", CASES)
def test_monotone_in_seq_and_batch(wl, recompute, attention, name):
    seqs = (128, 256, 512)
    dtype = "bf16"
    by_seq = totals([job(name, wl=wl, recompute=recompute, attention=attention, seq=s, dtype=dtype)
                     for s in seqs])
    by_batch = totals([job(name, wl=wl, recompute=recompute, attention=attention, seq=256, batch=b)
                       for b in (1, 2, 4, 8)])
    assert np.all(np.diff(by_seq) >= 0) and np.all(np.diff(by_batch) >= 0)
    if wl != "train":
        # full training at short sequences peaks in the optimizer step (a plateau); elsewhere
        # every extra token costs memory
        assert np.all(np.diff(by_seq) > 0) and np.all(np.diff(by_batch) > 0)


def test_memory_per_gpu_falls_with_zero_stage():
    # DeepSpeed's stages each shard one more kind of state
    stages = totals([job("llama2-7b", parallel=Parallel(f"zero{z}", dp=8, zero=z, stack="deepspeed"))
                     for z in (0, 1, 2, 3)])
    assert np.all(np.diff(stages) <= 0)
    assert stages[3] < stages[1] < stages[0]
    # FSDP2's ZeRO-2 keeps every block gathered from its forward to its backward (beside the
    # shards): below plain data parallel, above its own ZeRO-3 (docs/parallel.md, measured)
    fsdp = totals([job("llama2-7b", parallel=Parallel(f"zero{z}", dp=8, zero=z)) for z in (0, 2, 3)])
    assert fsdp[2] < fsdp[1] < fsdp[0]


def test_memory_per_gpu_falls_with_tensor_parallel():
    for wl in ("train", "inference"):
        tps = totals([job("llama2-70b", wl=wl, parallel=p) for p in ("single", "tp2", "tp4", "tp8")])
        assert np.all(np.diff(tps) < 0)
    plain, sp = totals([job("llama2-70b", parallel="tp8", recompute="selective"),
                        job("llama2-70b", parallel="tp8_sp", recompute="selective")])
    assert sp <= plain


def test_recompute_and_flash_attention_save_activation_memory():
    acts = [DETAILED(Columns.from_specs([job("llama3-8b", seq=8192, recompute=r, attention=a)])).activations[0]
            for r, a in (("none", "eager"), ("selective", "eager"), ("none", "sdpa"), ("full", "sdpa"))]
    assert acts[0] > acts[1] and acts[0] > acts[2] > acts[3]


def test_kv_cache_per_token_matches_known_sizes():
    # Llama-2-7B fp16: 2 (K,V) x 32 layers x 4096 x 2 B = 512 KiB per token;
    # Llama-3-8B (GQA, 8 KV heads): 2 x 32 x 8 x 128 x 2 B = 128 KiB per token.
    for name, per_token in (("llama2-7b", 512 * 1024), ("llama3-8b", 128 * 1024)):
        c = Columns.from_specs([job(name, wl="inference", seq=1000, dtype="fp16")])
        assert kv_cache_bytes(c)[0] == per_token * (1000 + 128)
    train = Columns.from_specs([job("llama3-8b")])
    assert kv_cache_bytes(train)[0] == 0


def test_mixed_adam_training_is_at_least_16_bytes_per_param():
    # fp32 weights (4) + fp32 gradients (4) + Adam m, v (8): the floor for AMP-style training.
    spec = job("llama2-7b")
    assert totals([spec])[0] >= 16 * 6_738_415_616


def test_logits_are_counted_and_grow_with_vocab():
    small_v, big_v = (DETAILED(Columns.from_specs([job(n, seq=4096, optimizer="sgd")])).logits[0]
                      for n in ("llama2-7b", "llama3-8b"))
    assert small_v > 0 and big_v / small_v == pytest.approx(128256 / 32000)


def test_vectorized_equals_one_at_a_time():
    specs = [job(n, wl=w, seq=s, batch=b) for n, w, s, b in itertools.product(
        ("llama3-8b", "gpt2", "bert-base-uncased"), ("train", "lora", "inference"), (128, 512), (1, 3))]
    together = {f: FORMULAS[f](Columns.from_specs(specs)) for f in FORMULAS}
    for i, spec in enumerate(specs):
        alone = Columns.from_specs([spec])
        for name, formula in FORMULAS.items():
            b = formula(alone)
            for t in TERMS:
                assert getattr(together[name], t)[i] == getattr(b, t)[0], (name, t, spec)


def test_breakdown_total_is_the_sum_of_terms():
    b = DETAILED(Columns.from_specs([job("mistral-7b", seq=s) for s in (512, 8192)]))
    np.testing.assert_allclose(b.total, sum(getattr(b, t) for t in TERMS))


def test_training_grows_strictly_once_activations_dominate():
    long = totals([job("llama3-8b", seq=s) for s in (8192, 16384, 32768)])
    assert np.all(np.diff(long) > 0)


# --- which moment set the peak (issue 14) -----------------------------------------------------

def test_peak_phase_names_the_moment_peak_breakdown_reports():
    from memsweep.formulas.detailed import (
        INFERENCE_PHASES, PHASES, TRAIN_PHASES, _moments, peak_phase,
    )

    specs = [job(n, wl=w, seq=s, attention=a, recompute=r) for n, w, s, a, r in itertools.product(
        ("llama3-8b", "gpt2", "tiny"), ("train", "lora", "inference", "serve"), (64, 768), ("sdpa", "eager"),
        ("none", "full")) if not (w == "serve" and (a == "eager" or n == "gpt2"))]
    c = Columns.from_specs(specs)
    k = DETAILED.constants
    train, infer, serve = _moments(c, k)
    assert len(train) == len(TRAIN_PHASES) and len(infer) == len(INFERENCE_PHASES)
    assert len(set(PHASES)) == len(PHASES)
    moments = dict(zip((*TRAIN_PHASES, *INFERENCE_PHASES, "serve_profile"), (*train, *infer, serve)))
    names, peak = peak_phase(c, k), DETAILED(c)
    for i, name in enumerate(names):
        for t in TERMS:
            assert getattr(moments[name], t)[i] == getattr(peak, t)[i], (specs[i].model.name, name, t)
    assert {"optimizer_step", "forward", "prefill", "serve_profile"} <= set(names)


def test_a_foreach_step_at_a_short_seq_peaks_in_its_temporaries_a_long_seq_in_the_forward():
    from memsweep.estimate import estimate_rows
    from memsweep.specs import OptimizerSpec

    short = estimate_rows(job("tiny", seq=64), [DETAILED])[0]
    assert short["peak_phase"] == "optimizer_step" and short["optimizer_step_bytes"] > 0
    # the step holds the token ids and targets only: 16 bytes a token
    assert short["activations_bytes"] == 16 * 64
    fused = estimate_rows(job("tiny", seq=64, optimizer=OptimizerSpec("adamw", "fused")), [DETAILED])[0]
    assert fused["optimizer_step_bytes"] == 0 and fused["optimizer_bytes"] == short["optimizer_bytes"]
    long = estimate_rows(job("tiny", seq=4096), [DETAILED])[0]
    assert long["peak_phase"] in ("forward", "loss") and long["optimizer_step_bytes"] == 0
    assert sum(long[f"{t}_bytes"] for t in TERMS) == long["total_bytes"]


def test_inference_and_serving_name_their_phase():
    from memsweep.estimate import estimate_rows
    from conftest import workload

    phase = {name: estimate_rows(spec, [DETAILED])[0]["peak_phase"] for name, spec in (
        ("prefill", job("tiny", wl="inference", seq=512)),
        ("eager", job("tiny", wl="inference", seq=2048, attention="eager")),
        ("decode", job("tiny", wl=workload("inference", gen_tokens=4000), seq=64)),
        ("serve", job("llama3-8b", wl="serve", seq=4096)))}
    assert phase == {"prefill": "prefill", "eager": "prefill_scores", "decode": "decode", "serve": "serve_profile"}


# --- issue 25, part 5: a peak per measured phase ------------------------------------------------

@pytest.mark.parametrize("name,top,phases", [
    ("llama3-8b", dict(seq=2048), {"forward", "backward", "optimizer"}),
    ("llama3-8b", dict(seq=8192, wl="lora", recompute="full"), {"forward", "backward", "optimizer"}),
    ("mixtral-8x7b", dict(seq=4096, wl="inference"), {"prefill", "decode"}),
    ("bert-base-uncased", dict(seq=512, wl="inference"), {"prefill"}),  # an encoder: no decode
])
def test_detailed_rows_carry_each_phase_peak_and_the_total_is_the_largest(name, top, phases):
    from memsweep.estimate import estimate_rows
    from memsweep.formulas import FORMULAS
    from memsweep.formulas.detailed import PHASE_OF_MOMENT
    from memsweep.results import frame

    spec = job(name, **top)
    rows = {r["formula"]: r for r in estimate_rows(spec, list(FORMULAS.values()))}
    d = rows["detailed"]
    got = {p for p in ("forward", "backward", "optimizer", "prefill", "decode") if d.get(f"{p}_peak_bytes") is not None}
    assert got == phases
    assert max(d[f"{p}_peak_bytes"] for p in got) == d["total_bytes"]
    assert PHASE_OF_MOMENT[d["peak_phase"]] == max(got, key=lambda p: d[f"{p}_peak_bytes"])
    assert all(rows[f].get("forward_peak_bytes") is None for f in rows if f != "detailed")
    t = frame(list(rows.values()))  # the schema holds them
    assert t.filter(t["formula"] == "detailed")[f"{next(iter(phases))}_peak_bytes"][0] > 0


def test_fit_reports_each_phase_against_its_measurement():
    import polars as pl

    from memsweep.fit import phase_errors

    t = pl.DataFrame({"job_id": ["a", "b"], "formula": ["detailed", "detailed"], "model": ["m", "m"],
                      "workload": ["train", "inference"], "seq": [1, 1], "batch": [1, 1], "dtype": ["bf16"] * 2,
                      "precision": ["mixed", "pure"], "recompute": ["none"] * 2, "status": ["ok", "ok"],
                      "forward_peak_bytes": [110, None], "measured_forward_peak_bytes": [100, None],
                      "backward_peak_bytes": [90, None], "measured_backward_peak_bytes": [100, None],
                      "prefill_peak_bytes": [None, 50], "measured_prefill_peak_bytes": [None, 40]})
    e = phase_errors(t).sort("phase")
    assert e["phase"].to_list() == ["backward", "forward", "prefill"]
    assert e["error_pct"].round(6).to_list() == [-10.0, 10.0, 25.0]
