"""Issue 13: the techniques of real stacks. Each has a golden number from its source, fake == cpu on
a tiny model where it runs on a CPU, `detailed` within 1 % of the fake trace, and a one-line error
where it does not apply."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from conftest import job, model, same_phases, workload

from memsweep.columns import Columns
from memsweep.errors import ConfigError
from memsweep.estimate import estimate_rows
from memsweep.formulas import FORMULAS
from memsweep.formulas import detailed as d
from memsweep.formulas import techniques as tq
from memsweep.specs import LossSpec, MeasureSpec, OffloadSpec, OptimizerSpec

GIB = 2**30
FAKE, CPU = MeasureSpec("fake", "fake"), MeasureSpec("cpu", "cpu")
FAKE_CPU_KERNELS = MeasureSpec("fake", "fake", sdpa="device")  # the CPU's SDPA kernels: equal to cpu
# a llama-family model small enough for a CPU run, GQA and untied (its 1-D tensors are under
# bitsandbytes' 4096 elements: their 8-bit Adam states stay 32-bit)
TINY = dataclasses.replace(model("llama3-8b"), name="tiny-llama", layers=2, hidden=256, heads=4, kv_heads=2,
                           ffn=768, vocab=1024)


def cols(spec):
    return Columns.from_specs([spec])


def total(spec) -> float:
    return float(FORMULAS["detailed"](cols(spec)).total[0])


# --- goldens from the sources -------------------------------------------------------------------------

def test_nf4_bits_per_parameter_are_qloras():
    """QLoRA (Dettmers et al. 2023, sec. 3): blocks of 64 with an fp32 absmax cost 32/64 = 0.5 bits
    per parameter; double quantization (8-bit absmax, an fp32 constant per 256 blocks) 8/64 +
    32/(64*256) = 0.127 bits."""
    bits, group, per_group, _, _ = tq.quant_layout("nf4", 64, double_quant=False)
    assert bits == 4 and per_group / group * 8 == 0.5
    _, group, per_group, _, _ = tq.quant_layout("nf4", 64, double_quant=True)
    assert round(per_group / group * 8, 3) == 0.127


def test_awq_llama3_8b_checkpoint_size():
    """hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4 (group 128): its two safetensors files are
    4.68 GB + 1.05 GB = 5.73 GB (the model card's file list); the inference weights here: int4
    block matrices with fp16 scales and packed zeros, 16-bit embeddings and lm_head."""
    spec = job("llama3-8b", wl=workload("inference", quant="awq"))
    assert d.weights_bytes(cols(spec))[0] / 1e9 == pytest.approx(5.73, rel=0.01)
    # the legacy dtype=int4 is that layout; it used to be params x 0.5 bytes, 30 % low
    legacy = job("llama3-8b", wl="inference", dtype="int4")
    assert d.weights_bytes(cols(legacy))[0] == d.weights_bytes(cols(spec))[0]
    assert d.weights_bytes(cols(legacy))[0] > 1.25 * 8.03e9 * 0.5


def test_bitsandbytes_8bit_adam_bytes_per_parameter():
    """bitsandbytes AdamW8bit (optim/optimizer.py, Optimizer2State, 0.44+): two uint8 states and an
    fp32 absmax per 256 elements each = 2 + 2 * 4 / 256 = 2.03125 bytes per parameter; 32-bit
    states (8 bytes) for tensors under 4096 elements. llama3-8b's are all 4096 wide or more."""
    spec = job("llama3-8b", optimizer="adamw8bit")
    c = cols(spec)
    assert d.optimizer_bytes(c)[0] / d.updated_params(c)[0] == pytest.approx(2.03125, abs=1e-9)
    small = job(TINY, optimizer="adamw8bit")
    vectors = tq.vector_params(cols(small), d.updated_params(cols(small)))[0]
    assert vectors == 2 * 2 * 256 + 256  # two norms per layer and the final one
    expected = 2 * ((d.updated_params(cols(small))[0] - vectors) * tq.BNB_8BIT_BYTES + vectors * 4)
    assert d.optimizer_bytes(cols(small))[0] == pytest.approx(expected)


def test_lion_and_adafactor_states():
    """Lion (Chen et al. 2023): one momentum, fp32 in bitsandbytes' 32-bit kernel. Adafactor
    (Shazeer & Stern 2018; transformers' Adafactor): an fp32 row and column vector per matrix,
    a full fp32 second moment for 1-D tensors, an fp32 first moment only with beta1."""
    lion = cols(job("llama3-8b", optimizer="lion", precision="pure"))
    assert d.optimizer_bytes(lion)[0] == 4 * d.updated_params(lion)[0]
    ada = cols(job(TINY, optimizer="adafactor", precision="pure"))
    h, f, kv, V = 256, 768, 2 * 64, 1024
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + f) + (f + h)  # q, k, v, o, gate, up, down
    matrices = 2 * per_layer + 2 * (V + h)  # + embedding and untied head
    assert d.optimizer_bytes(ada)[0] == 4 * (matrices + 5 * h)
    beta1 = cols(job(TINY, optimizer=OptimizerSpec("adafactor", "forloop", first_moment=True), precision="pure"))
    assert d.optimizer_bytes(beta1)[0] - d.optimizer_bytes(ada)[0] == 4 * d.updated_params(ada)[0]


def test_liger_chunk_size_example():
    """Liger-Kernel's fused_linear_cross_entropy.py: 'BT = 4096*4, V = 32000, H = 4096 ==>
    inc_factor = 8, chunk_size = 2048'."""
    c = Columns.from_arrays(batch=4, seq=4096, vocab=32000, hidden=4096)
    assert tq.liger_chunk_tokens(c)[0] == 2048


def test_kv_cache_bytes_per_token():
    """vLLM (FullAttentionSpec.page_size_bytes): 2 x layers x kv_heads x head_dim x bytes per token:
    llama3-8b 2 * 32 * 8 * 128 * 2 = 128 KiB in bf16, half in fp8."""
    for kv, want in (("auto", 131072), ("fp8", 65536)):
        rows = estimate_rows(job("llama3-8b", wl="serve", kv_dtype=kv, seq=4096), [FORMULAS["detailed"]])
        assert rows[0]["kv_bytes_per_token"] == want


def test_serve_answers_concurrency_as_vllm_computes_it():
    """KV cache = gpu_util x memory - (weights + profiled peak + non-torch); sequences at context N
    = whole blocks (vLLM: num_blocks // ceil(N / block_size))."""
    spec = job("llama3-8b", wl="serve", seq=4096, hardware="a100-80g")
    row = estimate_rows(spec, [FORMULAS["detailed"]])[0]
    budget = math.ceil(0.9 * 81920 * 2**20) - 512 * 2**20
    assert row["capacity_bytes"] == budget
    free = budget - (row["total_bytes"] - row["kv_cache_bytes"])
    assert row["kv_tokens"] == int(free // (131072 * 16)) * 16
    assert row["max_concurrent_seqs"] == int(free // (131072 * 4096))
    assert row["kv_cache_bytes"] == 131072 * 4096  # batch 1: one sequence of 4096 tokens
    # weights and the chunked-prefill peak fit well under 16 GiB: ~430k tokens, ~110 sequences
    assert 400_000 < row["kv_tokens"] < 480_000 and 100 <= row["max_concurrent_seqs"] <= 118
    fp8 = estimate_rows(dataclasses.replace(spec, kv_dtype="fp8"), [FORMULAS["detailed"]])[0]
    assert fp8["max_concurrent_seqs"] == pytest.approx(2 * row["max_concurrent_seqs"], abs=1)


def test_offload_moves_model_states_to_cpu_as_deepspeed_counts_them():
    """DeepSpeed estimate_zero2_model_states_mem_needs (offload_optimizer): the GPU keeps the 16-bit
    parameters (2 bytes each), the CPU the fp32 master, gradients and Adam states (16 bytes each;
    the estimator multiplies by its 1.5 buffer factor on top)."""
    base = job("llama3-8b", recompute="full")
    off = dataclasses.replace(base, offload=OffloadSpec(optimizer=True))
    c = cols(off)
    p = d.updated_params(c)[0]
    assert d.weights_bytes(c)[0] == 2 * p and d.optimizer_bytes(c)[0] == 0 and d.gradients_bytes(c)[0] == 0
    assert d.cpu_bytes(c)[0] == 16 * p
    assert total(off) < total(base) - 12 * p
    both = cols(dataclasses.replace(base, offload=OffloadSpec(optimizer=True, params=True)))
    assert d.weights_bytes(both)[0] < 0.2 * 2 * p and d.cpu_bytes(both)[0] == 18 * p


def test_prefill_logits_of_a_long_prompt():
    """Older transformers kept the whole prompt's logits and upcast them (`logits.float()`): a
    30k-token prompt of llama3-8b holds t*V*(2 + 4) bytes, 21.5 GiB, where `logits_to_keep=1`
    keeps one row."""
    last = job("llama3-8b", wl="inference", seq=30000)
    full = job("llama3-8b", wl=workload("inference", prefill_logits="all"), seq=30000)
    assert d.inference_logits_bytes(cols(full))[0] == 30000 * 128256 * 6
    assert total(full) - total(last) > 18 * GIB


# --- the reference step traces each technique: fake == cpu, detailed == fake ------------------------

CASES = {
    "qlora": dict(wl="qlora"),  # the HF recipe: peft's prepare_model_for_kbit_training (fp32 non-quantized)
    "qlora-torchtune": dict(wl=workload("qlora", kbit_prepare=False)),
    "qlora-kbit-pure": dict(wl="qlora", precision="pure"),
    "qlora-kbit-eager": dict(wl="qlora", attention="eager", seq=64),
    # LoRA's re-run block places a few t*h tensors at another moment at the toy's shapes (h = t):
    # the recompute case runs a real model, llama3.2-1b (h = 2048), at 256 tokens
    "qlora-full-recompute": dict(model="llama3.2-1b", wl="qlora", recompute="full", seq=256, batch=1),
    "adamw8bit-pure": dict(optimizer="adamw8bit", precision="pure"),
    "lion": dict(optimizer="lion"),
    "adafactor-pure": dict(optimizer="adafactor", precision="pure"),
    "in-backward": dict(optimizer=OptimizerSpec("adamw", in_backward=True)),
    "chunked-loss": dict(loss=LossSpec(chunks=4)),
    "chunked-loss-lora": dict(wl="lora", loss=LossSpec(chunks=4)),
    "grad-accum-recompute": dict(grad_accum=2, recompute="full", precision="pure"),
    "gptq-inference": dict(wl=workload("inference", quant="gptq", gen_tokens=4)),
    "all-logits-inference": dict(wl=workload("inference", prefill_logits="all", gen_tokens=4)),
}


def tiny_job(measure, model=TINY, **kw):
    return job(model, measure=measure, **{"seq": 128, "batch": 2, **kw})


@pytest.fixture(scope="module")
def fake_runs():
    pytest.importorskip("torch")
    from memsweep.measure.backends import measure

    return {name: measure(tiny_job(FAKE, **kw)) for name, kw in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_detailed_within_one_percent_of_the_traced_step(fake_runs, name):
    m = fake_runs[name]
    assert m.status == "ok", m.error
    est = total(tiny_job(FAKE, **CASES[name]))
    assert abs(est - m.peak_bytes) <= 0.01 * m.peak_bytes, (name, est, m.peak_bytes)


@pytest.mark.parametrize("name", ["qlora", "qlora-kbit-pure", "adamw8bit-pure", "adafactor-pure", "in-backward", "chunked-loss",
                                  "grad-accum-recompute", "gptq-inference", "all-logits-inference"])
def test_fake_equals_cpu(fake_runs, name):
    from memsweep.measure.backends import measure

    cpu = measure(tiny_job(CPU, **CASES[name]))
    assert cpu.status == "ok", cpu.error
    fake = fake_runs[name]
    if fake.attn_kernel not in (None, cpu.attn_kernel):  # the GPU's kernel differs: trace the CPU's
        fake = measure(tiny_job(FAKE_CPU_KERNELS, **CASES[name]))
    same_phases(fake, cpu)
    assert fake.peak_bytes == cpu.peak_bytes or "decode" in cpu.phase_peaks


def test_quantized_weights_are_stored_as_the_layout_says(fake_runs):
    """The traced weights of a QLoRA base equal the formula's bytes (packed values, block absmax
    with double quantization, 16-bit embeddings / head / norms, fp32 adapters)."""
    m = fake_runs["qlora"]
    spec = tiny_job(FAKE, wl="qlora")
    assert m.breakdown["weights"] == pytest.approx(d.weights_bytes(cols(spec))[0], rel=1e-3)


def test_kbit_prepare_is_peft_casting_the_rest_of_the_base_to_fp32(fake_runs):
    """peft's prepare_model_for_kbit_training: every parameter not quantized (embeddings, head,
    norms) goes from 2 to 4 bytes, in the trace and in the formula; the fp32 hidden states and the
    head's saved 16-bit cast make the step larger than torchtune's QLoRA of the same base."""
    hf, tt = fake_runs["qlora"], fake_runs["qlora-torchtune"]
    spec = tiny_job(FAKE, wl="qlora")
    c = cols(spec)
    other = d.base_params(c)[0] - tq.matrix_sides(c)[0][0]  # what bitsandbytes leaves unquantized
    assert hf.breakdown["weights"] - tt.breakdown["weights"] == pytest.approx(2 * other, rel=1e-6)
    assert d.weights_bytes(c)[0] - d.weights_bytes(cols(tiny_job(FAKE, wl=workload("qlora", kbit_prepare=False))))[0] == 2 * other
    v, h = TINY.vocab, TINY.hidden
    assert hf.peak_bytes - tt.peak_bytes > 2 * other + 2 * v * h  # + the head's cast, fp32 activations
    assert d.precision_class(c)[0] == 3 and d.precision_class(cols(tiny_job(FAKE, wl="qlora", precision="pure")))[0] == 4


@pytest.mark.parametrize("wl", ["lora", "qlora"])
def test_lora_under_full_recompute_holds_its_adapter_casts_while_the_loss_runs(wl):
    """Autocast caches the 16-bit cast of every fp32 adapter until its context ends, and the loss
    runs inside it: with full recompute nothing else keeps them, so the loss moment holds 2 bytes per
    adapter parameter (a rank-64 LoRA of the tiny model: 8 % of that moment). detailed's loss
    moment equals the traced forward's peak."""
    pytest.importorskip("torch")
    from memsweep.measure.backends import measure

    spec = tiny_job(FAKE, wl=workload(wl, lora_rank=64, lora_targets=("q", "k", "v", "o", "gate", "up", "down")),
                    recompute="full")
    m = measure(spec)
    assert m.status == "ok", m.error
    c = cols(spec)
    train, _, _ = d._moments(c, d.DetailedConstants())
    loss = max(train[0].total[0], train[1].total[0])
    traced = m.row_fields()["measured_forward_peak_bytes"]
    assert d.autocast_cache_bytes(c)[0] == 2 * d.lora_params(c)[0] > 0.05 * traced
    assert loss == pytest.approx(traced, rel=1e-3)


@pytest.mark.parametrize("kw, words", [
    (dict(kind="lora", lora_rank=8, lora_targets=("q",), kbit_prepare=True), "quant none"),
    (dict(kind="lora", lora_rank=8, lora_targets=("q",), quant="awq", kbit_prepare=True), "quant awq"),
    (dict(kind="inference", quant="nf4", kbit_prepare=True), "kind inference"),
])
def test_kbit_prepare_needs_a_kbit_lora_base(kw, words):
    from memsweep.specs import Workload

    with pytest.raises(ConfigError) as err:
        Workload(name="w", **kw)
    text = str(err.value)
    assert text.startswith("workload.kbit_prepare=True") and words in text and "\n" not in text


def test_kbit_prepare_on_gptq_or_fp32_casts_nothing():
    """peft leaves a GPTQ model's parameters as they are; an fp32 base has nothing 16-bit to cast."""
    gptq = job("llama3-8b", wl=workload("qlora", quant="gptq", kbit_prepare=True))
    plain = job("llama3-8b", wl=workload("qlora", quant="gptq", kbit_prepare=False))
    assert total(gptq) == total(plain) and not gptq.kbit
    assert not job("llama3-8b", wl="qlora", dtype="fp32").kbit


def test_chunked_loss_and_8bit_states_shrink_the_step(fake_runs):
    """LoRA's peak is the loss's (no gradient set, no optimizer step worth the name): torchtune's
    chunks take the fp32 copy and the two fp32 gradients of the logits down to one chunk's."""
    plain = total(tiny_job(FAKE, wl="lora"))
    t_v = 2 * 128 * 1024
    saved = plain - total(tiny_job(FAKE, wl="lora", loss=LossSpec(chunks=4)))
    # at least the forward's fp32 copy, at most the backward's two fp32 gradients, three chunks in four
    assert 0.75 * t_v * 4 <= saved <= 0.75 * 2 * t_v * 4
    assert fake_runs["adamw8bit-pure"].breakdown["optimizer"] < 0.35 * 2 * 4 * d.updated_params(cols(tiny_job(FAKE)))[0]


def test_analytic_only_techniques_are_skipped_rows_that_say_why():
    pytest.importorskip("torch")
    from memsweep.measure.backends import measure

    for kw, words in ((dict(wl=workload("inference", gen_tokens=4), kv_dtype="fp8"), "kv_dtype=fp8"),
                      (dict(offload=OffloadSpec(optimizer=True)), "offload"),
                      (dict(mixed_policy="param_dtype"), "mixed_policy")):
        m = measure(tiny_job(FAKE, **kw))
        assert m.status == "skipped" and words in m.error


# --- where a technique does not apply: one line naming the key --------------------------------------

@pytest.mark.parametrize("make, key", [
    (lambda: job("llama3-8b", wl=workload("train", quant="nf4")), "workload.quant"),
    (lambda: job("llama3-8b", wl="inference", loss=LossSpec(chunks=8)), "loss.chunks"),
    (lambda: job("llama3-8b", kv_dtype="fp8"), "kv_dtype"),
    (lambda: job("llama3-8b", offload=OffloadSpec(activations=True)), "offload.activations"),
    (lambda: job("llama3-8b", optimizer=OptimizerSpec("adamw", in_backward=True), grad_accum=4), "grad_accum"),
    (lambda: job("llama3-8b", wl="inference", grad_accum=2), "grad_accum"),
    (lambda: job("llama3-8b", wl="serve", measure=FAKE), "measure.backend"),
    (lambda: job("llama3-8b", wl=workload("inference", quant="awq"), dtype="int4"), "dtype"),
    (lambda: OffloadSpec(params=True), "offload.params"),
])
def test_misplaced_technique_is_one_line(make, key):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value).startswith(f"{key}=") and "\n" not in str(err.value)


@pytest.mark.parametrize("kw, key", [
    (dict(name="adamw8bit", impl="foreach"), "optimizer.impl"),
    (dict(name="adafactor", impl="fused"), "optimizer.impl"),
    (dict(name="adamw", first_moment=True), "optimizer.first_moment"),
])
def test_optimizer_settings_are_checked(kw, key):
    with pytest.raises(ConfigError) as err:
        OptimizerSpec(**kw)
    assert str(err.value).startswith(f"{key}=")


def test_seed_formulas_decline_techniques_they_do_not_model():
    rows = estimate_rows(job("llama3-8b", wl="qlora", optimizer="adamw8bit"), list(FORMULAS.values()))
    by = {r["formula"]: r for r in rows}
    assert by["detailed"]["status"] == "ok" and by["detailed"]["quant"] == "nf4"
    for name in ("seed_naive", "seed_mixed", "seed_korthikanti", "seed_rule4x"):
        assert by[name]["status"] == "unsupported" and "workload.quant=nf4" in by[name]["error"]
        assert by[name].get("total_bytes") is None


def test_param_dtype_policy_saves_no_weight_casts():
    """Autocast saves every layer's 16-bit weight cast for the backward (and keeps an fp32 residual
    stream); FSDP2's MixedPrecisionPolicy (and DeepSpeed bf16) computes with 16-bit parameters: the
    activations are a pure 16-bit model's. llama2-7b's ZeRO-3 gap (26.5 vs 11.7 GiB) is autocast's."""
    zero3 = dict(parallel="zero3")
    mixed = d.saved_activations_bytes(cols(job("llama2-7b", **zero3)))[0]
    policy = d.saved_activations_bytes(cols(job("llama2-7b", mixed_policy="param_dtype", **zero3)))[0]
    pure = d.saved_activations_bytes(cols(job("llama2-7b", precision="pure", **zero3)))[0]
    # autocast also keeps the fp32 residual stream's activations; the casts are 2 bytes per weight
    assert policy == pure and mixed - policy > 2 * 32 * 202_383_360
    # the model states stay 16 bytes per parameter: 2 (16-bit) + 4 (master) + 4 (grads) + 8 (Adam)
    c = cols(job("llama2-7b", mixed_policy="param_dtype"))
    states = d.weights_bytes(c) + d.optimizer_bytes(c) + d.gradients_bytes(c)
    assert states[0] == pytest.approx(18 * d.updated_params(c)[0])
    assert np.all(d.weights_bytes(c) == 2 * d.updated_params(c))


@pytest.mark.parametrize("kw", [dict(optimizer="adamw8bit", grad_accum=2),
                                dict(optimizer=OptimizerSpec("adafactor", "forloop", in_backward=True), precision="pure")])
def test_transformers_steps_with_the_same_optimizers(kw):
    """The optimizers and the step loop are shared: transformers' model (measure.impl=hf) holds the
    reference's optimizer state and gradients to the byte at the step."""
    pytest.importorskip("transformers")
    from memsweep.measure.backends import measure

    runs = {impl: measure(tiny_job(MeasureSpec("fake", "fake", impl=impl), model=model("tiny"), seq=32, **kw))
            for impl in ("reference", "hf")}
    assert all(m.status == "ok" for m in runs.values()), [m.error for m in runs.values()]
    ref, hf_ = runs["reference"].phase_breakdowns["optimizer"], runs["hf"].phase_breakdowns["optimizer"]
    assert ref["optimizer"] == hf_["optimizer"] and ref["gradients"] == hf_["gradients"]
