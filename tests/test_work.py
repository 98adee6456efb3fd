"""Work per step (formulas/work.py): the matmul FLOPs equal torch's FlopCounterMode on the reference
step traced under fake tensors, integer for integer, for every family and workload; the totals
reproduce the textbook 6·N·T rule; the causal count halves attention at long sequences; the
formulas are vectorized."""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

import numpy as np
import pytest
from conftest import job, model, workload

from memsweep.columns import Columns, base_params, embedding_params
from memsweep.formulas.work import Work, step_work
from memsweep.specs import JobSpec, LossSpec, lora_targets_of

TINY = model("tiny")  # llama-style: 2 layers, h 64, 4 heads, 2 KV heads, SwiGLU 128, V 256
MOE = dict(experts=4, experts_per_token=2, expert_ffn=48)
FAMILIES = {
    "gpt2": replace(model("gpt2"), layers=2, hidden=64, heads=4, kv_heads=4, ffn=256, vocab=256, max_positions=64),
    "bert": replace(model("bert-base-uncased"), layers=2, hidden=64, heads=4, kv_heads=4, ffn=256, vocab=256,
                    max_positions=64),
    "llama": TINY,  # GQA
    "qwen2": replace(TINY, qkv_bias=True),
    "mistral": replace(TINY, sliding_window=6, layer_pattern=("local",)),
    "gemma": replace(TINY, layers=3, mlp="geglu", block_norms=4, qk_norm="head", head_dim=32, tied_embeddings=True,
                     sliding_window=6, layer_pattern=("local", "global")),  # Gemma-2/3
    "neox": replace(TINY, block="parallel", norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
                    rotary_fraction=0.25, kv_heads=4),  # parallel block, two norms
    "falcon": replace(TINY, block="parallel", block_norms=1, norm="layernorm", mlp="gelu", kv_heads=1),  # one norm, MQA
    "mixtral": replace(TINY, **MOE),
    "qwen3-moe": replace(TINY, qk_norm="head", experts=5, experts_per_token=2, expert_ffn=40),  # E x C padded
    "qwen2-moe": replace(TINY, layers=3, qkv_bias=True, shared_experts=1, shared_ffn=80, shared_expert_gate=True,
                         dense_layers=1, **MOE),
    "deepseek-v3": replace(TINY, layers=3, kv_heads=4, head_dim=24, q_lora_rank=32, kv_lora_rank=16, rope_head_dim=8,
                           v_head_dim=16, dense_layers=1, shared_experts=1, **MOE),  # MLA, latent cache
    "gpt-oss": replace(TINY, head_dim=16, qkv_bias=True, out_bias=True, mlp_bias=True, router_bias=True,
                       attention_sinks=True, sliding_window=6, layer_pattern=("local", "global"), **MOE),
}
GEN = workload("inference", gen_tokens=3)


def _cases() -> dict[str, tuple[str, dict]]:
    """Every family trains, fine-tunes (LoRA) and infers, with full recompute and both attentions
    spread over them; then the corners (selective recompute, QLoRA, adapters on some matrices only,
    all-position logits, MLA's expanded cache, micro-batches and a chunked loss). The whole product
    is `test_every_combination` (MEMSWEEP_WORK_ALL=1, about 3 minutes)."""
    cases: dict[str, tuple[str, dict]] = {}
    for i, name in enumerate(FAMILIES):
        eager = "eager" if i % 2 else "sdpa"
        other = "sdpa" if i % 2 else "eager"
        cases[f"{name}-train-full-{eager}"] = (name, dict(recompute="full", attention=eager))
        cases[f"{name}-lora-{['none', 'full'][i % 2]}-{other}"] = (name, dict(wl="lora", attention=other,
                                                                        recompute=["none", "full"][i % 2]))
        cases[f"{name}-inference-{other}"] = (name, dict(wl=GEN, attention=other))
    more = {
        "llama-train-none-sdpa": ("llama", dict()),
        "llama-train-selective-eager": ("llama", dict(recompute="selective", attention="eager")),
        "deepseek-v3-train-selective-sdpa": ("deepseek-v3", dict(recompute="selective")),
        "gemma-lora-all-full-eager": ("gemma", dict(wl="lora-all", recompute="full", attention="eager")),
        "mixtral-lora-mlp-full-sdpa": ("mixtral", dict(wl=workload("lora", lora_targets=("gate", "up", "down")),
                                                       recompute="full")),
        "deepseek-v3-lora-all-full-eager": ("deepseek-v3", dict(wl="lora-all", recompute="full", attention="eager")),
        "falcon-lora-qv-full-sdpa": ("falcon", dict(wl=workload("lora", lora_targets=("q", "v")), recompute="full")),
        "llama-qlora-full-sdpa": ("llama", dict(wl="qlora", recompute="full")),
        "gpt2-qlora-none-eager": ("gpt2", dict(wl=workload("qlora", lora_targets=("q", "k", "v", "o", "up", "down")),
                                               attention="eager")),
        "llama-inference-all-logits": ("llama", dict(wl=workload("inference", gen_tokens=2, prefill_logits="all"))),
        "mla-expanded-inference": ("deepseek-v3", dict(model=dict(mla_cache="expanded", q_lora_rank=0), wl=GEN)),
        "gemma-inference-long-decode-eager": ("gemma", dict(wl=workload("inference", gen_tokens=6), seq=4,
                                                            attention="eager")),
        "llama-grad-accum-chunked-loss": ("llama", dict(grad_accum=2, loss=LossSpec(chunks=3))),
    }
    cases.update(more)
    return cases


CASES = _cases()


def case_spec(name: str, kw: dict) -> JobSpec:
    kw = dict(kw)
    m = replace(FAMILIES[name], **kw.pop("model", {}))
    if kw.get("wl") == "lora-all":
        kw["wl"] = workload("lora", lora_targets=lora_targets_of(m))
    kw.setdefault("seq", 9)  # longer than the windows; t·k not a multiple of E (padded experts)
    kw.setdefault("batch", 2)
    return job(m, **kw)


def _product() -> dict[str, tuple[str, dict]]:
    """family x {train, lora (q, k, v, o), lora on every matrix, qlora, inference (last / all
    logits)} x {recompute none, selective, full} x {sdpa, eager}."""
    cases = {}
    for name, m in FAMILIES.items():
        qlora = workload("qlora", lora_targets=lora_targets_of(m))
        loads = {"train": "train", "lora": "lora", "lora-all": "lora-all", "qlora": qlora, "inference": GEN,
                 "inference-all": workload("inference", gen_tokens=2, prefill_logits="all")}
        for wl, w in loads.items():
            if wl == "qlora" and m.experts:  # not traced: the reference experts are not quantized
                continue
            for rc in ("none", "selective", "full") if not wl.startswith("inference") else ("none",):
                for att in ("sdpa", "eager"):
                    cases[f"{name}-{wl}-{rc}-{att}"] = (name, dict(wl=w, recompute=rc, attention=att))
    return cases


# --- the reference step under FlopCounterMode ----------------------------------------------------

class PhaseFlops:
    """A tracker for `measure.workloads.prepare` that records the FLOPs each top-level phase adds to
    a running FlopCounterMode (recomputation runs inside the backward, so it is the backward's)."""

    def __init__(self, counter) -> None:
        self.counter, self.phases, self.depth = counter, {}, 0

    @contextlib.contextmanager
    def section(self, phase: str, category: str):
        self.depth += 1
        before = self.counter.get_total_flops()
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.phases[phase] = self.phases.get(phase, 0) + self.counter.get_total_flops() - before

    def mark(self, name: str) -> None:
        pass

    def retag(self, tensor, category: str) -> None:
        pass

    def adopt(self, model, optimizer=None) -> None:
        pass


def traced_flops(spec: JobSpec) -> dict[str, int]:
    """The reference step (every decode step, not the fake backend's jump to the last) traced under
    FakeTensorMode on the CPU, each phase's FlopCounterMode total. torch 2.13's counter has no
    formula for the CPU flash kernel sdpa dispatches to here; it gets the one the counter applies
    to CUDA's flash / efficient / cuDNN kernels, so the count is what a GPU trace counts."""
    torch = pytest.importorskip("torch")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    from memsweep.measure.autocast import cuda_policy
    from memsweep.measure.sdpa import cuda_sdpa
    from memsweep.measure.workloads import prepare

    aten = torch.ops.aten

    def forward(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    cpu_sdpa = {aten._scaled_dot_product_flash_attention_for_cpu: forward,
                aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}
    # the GPU's SDPA kernels and dropout (measure/sdpa.py): a CPU runs math for SDPA with dropout
    with FakeTensorMode(), cuda_policy(), cuda_sdpa(spec.hardware.capability):
        counter = FlopCounterMode(display=False, custom_mapping=cpu_sdpa)
        tracker = PhaseFlops(counter)
        with counter:
            prepare(spec, "cpu", tracker).step()
    return {phase: flops for phase, flops in tracker.phases.items() if flops}


def counted(w: Work) -> dict[str, int]:
    """The formula's FLOPs in the traced phases (recomputation runs inside the backward)."""
    phases = {"forward": w.forward_flops, "backward": w.backward_flops + w.recompute_flops,
              "prefill": w.prefill_flops, "decode": w.decode_flops}
    return {k: int(v[0]) for k, v in phases.items() if v[0]}


@pytest.mark.parametrize("case", CASES)
def test_matmul_flops_equal_flop_counter_on_the_reference_step(case):
    name, kw = CASES[case]
    spec = case_spec(name, kw)
    w = step_work(Columns.from_specs([spec]))
    traced = traced_flops(spec)
    assert counted(w) == traced
    assert int(w.matmul_flops[0]) == sum(traced.values())


@pytest.mark.skipif(not os.environ.get("MEMSWEEP_WORK_ALL"), reason="the whole product: MEMSWEEP_WORK_ALL=1")
def test_every_combination():
    wrong = {}
    for case, (name, kw) in _product().items():
        spec = case_spec(name, kw)
        formula, traced = counted(step_work(Columns.from_specs([spec]))), traced_flops(spec)
        if formula != traced:
            wrong[case] = (formula, traced)
    assert not wrong


def test_recompute_and_backward_split_as_traced():
    """Full recompute adds to the backward exactly `recompute_flops` (the block less its down
    projection, whose inputs are saved before it runs: checkpoint's early stop); eager selective
    recompute re-runs QK^T alone (PV's inputs are saved before it runs)."""
    spec = case_spec("llama", dict(attention="eager"))
    none = traced_flops(spec)["backward"]
    for rc in ("full", "selective"):
        s = replace(spec, recompute=rc)
        w = step_work(Columns.from_specs([s]))
        assert traced_flops(s)["backward"] - none == int(w.recompute_flops[0])
    c = Columns.from_specs([replace(spec, recompute="selective")])
    qk = 2 * spec.batch * spec.seq**2 * TINY.heads * TINY.dim_per_head * TINY.layers
    assert step_work(c).recompute_flops[0] == qk


@pytest.mark.parametrize("name,wl", [("llama", "train"), ("qwen2", "lora-all"), ("gemma", "train"), ("neox", "train"),
                                     ("falcon", "lora"), ("qwen2-moe", "train"), ("deepseek-v3", "lora-all"),
                                     ("gpt-oss", "train"), ("llama", "qlora")])
def test_per_op_selective_recomputes_all_but_the_kept_matmuls(name, wl):
    """recompute=op (torchtitan's per-op SAC): the backward re-runs the block less every other
    `aten.mm` (a linear with a bias is an addmm, re-run; adapters count) and the fused SDPA call,
    as the FlopCounterMode trace of the checkpointed step counts it; less than full recompute."""
    spec = case_spec(name, dict(wl=wl, recompute="op"))
    w = step_work(Columns.from_specs([spec]))
    assert counted(w) == traced_flops(spec)
    full = step_work(Columns.from_specs([replace(spec, recompute="full")]))
    assert 0 < w.recompute_flops[0] < full.recompute_flops[0]


# --- textbook numbers ----------------------------------------------------------------------------

def test_train_flops_reproduce_the_6NT_rule_on_llama3_8b():
    """Kaplan et al. 2020 (sec. 2.1, Table 1): a training step's matmuls are 6·N FLOPs per token (N
    without embeddings; the de-embedding, the LM head, is a matmul and counts), plus the attention
    term; Korthikanti et al. 2022 (sec. 5, the 72·B·s·l·h²(1 + s/6h + V/12hl) count) make it 3 x the
    forward's 4·B·s²·h per layer, 12·l·h·s per token. FlopCounterMode's sdpa backward re-counts the
    scores (2.5 x the forward, not 2): 14·l·h·s. Within 2 %; the matmul part exactly 6·N·T."""
    spec = job("llama3-8b", seq=2048, batch=1)
    c = Columns.from_specs([spec])
    w = step_work(c)
    m = spec.model
    tokens = spec.batch * spec.seq
    norms = (2 * m.layers + 1) * m.hidden
    n_matmul = base_params(c)[0] - embedding_params(c)[0] - norms  # the blocks' matrices and the head
    textbook = 6 * n_matmul * tokens + 12 * m.layers * m.hidden * spec.seq * tokens
    total = w.forward_flops[0] + w.backward_flops[0]
    assert abs(total - textbook) / textbook < 0.02
    assert total - w.attention_flops[0] == 6 * n_matmul * tokens
    assert w.attention_flops[0] == 14 * m.layers * m.hidden * spec.seq * tokens
    assert w.recompute_flops[0] == 0 and w.prefill_flops[0] == w.decode_flops[0] == 0
    # the forward alone is 2·N·T + 4·l·h·s·T
    assert w.forward_flops[0] == 2 * n_matmul * tokens + 4 * m.layers * m.hidden * spec.seq * tokens


def test_inference_flops_are_2N_per_token_plus_attention():
    """A decode step is 2 FLOPs per matrix weight and sequence, plus 4·l·h per cached key (kv
    heads shared, GQA: the query heads count); llama3-8b, one sequence, last-position logits."""
    spec = job("llama3-8b", wl=workload("inference", gen_tokens=16), seq=1024, batch=1)
    c = Columns.from_specs([spec])
    w = step_work(c)
    m = spec.model
    n_matmul = base_params(c)[0] - embedding_params(c)[0] - (2 * m.layers + 1) * m.hidden
    keys = sum(spec.seq + j + 1 for j in range(16))
    assert w.decode_flops[0] == 2 * n_matmul * 16 + 4 * m.layers * m.hidden * keys
    blocks = n_matmul - m.vocab * m.hidden
    assert w.prefill_flops[0] == 2 * blocks * spec.seq + 2 * m.vocab * m.hidden + 4 * m.layers * m.hidden * spec.seq**2


def test_causal_attention_is_half_the_counted_at_long_sequences():
    """A causal flash kernel visits s(s+1)/2 of the s² pairs; a sliding window of w about w·s."""
    spec = job("llama3-8b", seq=8192, batch=1)
    w = step_work(Columns.from_specs([spec]))
    s = spec.seq
    assert w.causal_attention_flops[0] / w.attention_flops[0] == pytest.approx((s + 1) / (2 * s), rel=1e-12)
    assert 0.5 < w.causal_attention_flops[0] / w.attention_flops[0] < 0.5001
    mistral = job("mistral-7b", seq=32768, batch=1)  # every layer local, window 4096
    w = step_work(Columns.from_specs([mistral]))
    win = mistral.model.sliding_window
    allowed = win * (win + 1) / 2 + (32768 - win) * win
    assert w.causal_attention_flops[0] / w.attention_flops[0] == pytest.approx(allowed / 32768**2, rel=1e-12)
    bert = job("bert-base-uncased", seq=512, batch=2)  # an encoder attends to every position
    w = step_work(Columns.from_specs([bert]))
    assert w.causal_attention_flops[0] == w.attention_flops[0]


def test_decode_bytes_grow_by_the_kv_cache_read():
    """Each decode step reads every weight and the whole cache so far: a longer prompt adds exactly
    the extra cached tokens' K and V (2 bytes, kv_heads x (d_k + d_v) per layer) per step."""
    gen = 32
    short, long = (job("llama3-8b", wl=workload("inference", gen_tokens=gen), seq=s, batch=4) for s in (1024, 9216))
    w = step_work(Columns.from_specs([short, long]))
    m = short.model
    per_token = m.layers * m.kv_heads * 2 * m.dim_per_head * 2.0
    assert w.decode_bytes[1] - w.decode_bytes[0] == pytest.approx(gen * 4 * 8192 * per_token, rel=1e-12)
    # the weights (not the embedding table: a row per token), read once per step, are most of a
    # short prompt's decode
    weights = (base_params(Columns.from_specs([short]))[0] - m.vocab * m.hidden) * 2.0
    assert 1.0 < w.decode_bytes[0] / (gen * weights) < 1.1


def test_optimizer_step_bytes_and_flops_per_parameter():
    """Mixed AdamW: parameter, gradient, m and v in fp32, 4 read + 3 written = 28 B and 14 FLOPs
    per parameter; plain SGD 12 B and 2; 8-bit AdamW 12 B + its two 8-bit states read and written."""
    rows = [job("llama3-8b", optimizer=o) for o in ("adamw", "sgd", "adamw8bit")]
    c = Columns.from_specs(rows)
    w = step_work(c)
    n = base_params(c)
    assert list(w.optimizer_bytes / n) == pytest.approx([28.0, 12.0, 12.0 + 4 * (1 + 4 / 256)])
    assert list(w.optimizer_flops / n) == pytest.approx([14.0, 2.0, 18.0])
    lora = step_work(Columns.from_specs([job("llama3-8b", wl="lora")]))
    assert lora.optimizer_flops[0] < w.optimizer_flops[0] / 100


def test_lora_backward_has_no_base_weight_gradients():
    """A frozen base computes input gradients only: LoRA's backward is about one forward, full
    training's about two (plus attention's 2.5 x and the adapters' own)."""
    train, lora = (step_work(Columns.from_specs([job("llama3-8b", wl=wl)])) for wl in ("train", "lora"))
    assert lora.backward_flops[0] / lora.forward_flops[0] == pytest.approx(1.0, abs=0.1)
    assert train.backward_flops[0] / train.forward_flops[0] == pytest.approx(2.0, abs=0.1)


def test_step_work_is_vectorized():
    """Many rows at once equal each row alone, every field (families, workloads, options mixed)."""
    specs = [case_spec(name, kw) for name, kw in CASES.values()]
    specs += [job("llama3-8b", seq=4096, recompute="full"), job("deepseek-v3", wl=GEN, seq=512),
              job("gemma-3-12b", wl="qlora", seq=2048, attention="eager"), job("mixtral-8x7b", wl="serve"),
              job("gpt-oss-20b", wl="lora", optimizer="lion", grad_accum=4),
              job("llama3-8b", loss=LossSpec(fused=True), optimizer="adafactor")]
    together = step_work(Columns.from_specs(specs))
    for i, spec in enumerate(specs):
        alone = step_work(Columns.from_specs([spec]))
        for field in Work.__dataclass_fields__:
            np.testing.assert_allclose(getattr(together, field)[i], getattr(alone, field)[0], rtol=1e-12,
                                       err_msg=f"{field} of {spec.model.name}")
    assert (together.matmul_flops > 0).all()
    for field in Work.__dataclass_fields__:
        assert np.isfinite(getattr(together, field)).all() and (getattr(together, field) >= 0).all(), field


def test_dropless_experts_and_the_mla_cache_expansion():
    """The reference pads every expert to ceil(t·k / E) rows: one sequence decoding through Mixtral
    (k = 2 of E = 8) runs all 8; a dropless count runs 2, its dense part unchanged. DeepSeek-V3's
    latent-cache decode re-expands the whole cache each step, `mla_cache_expansion_flops` of it."""
    from memsweep.formulas.work import mla_cache_expansion_flops

    spec = job("mixtral-8x7b", wl=workload("inference", gen_tokens=8), seq=512, batch=1)
    c = Columns.from_specs([spec])
    ref, dropless = step_work(c), step_work(c, dropless=True)
    m = spec.model
    expert = 3 * 2 * m.hidden * m.routed_ffn  # FLOPs of one expert per token copy
    assert ref.decode_flops[0] - dropless.decode_flops[0] == 8 * m.layers * (8 - 2) * expert
    assert ref.prefill_flops[0] == dropless.prefill_flops[0]  # 512·2 copies fill 8 experts evenly
    ds = Columns.from_specs([job("deepseek-v3", wl=workload("inference", gen_tokens=8), seq=512, batch=1)])
    expansion = mla_cache_expansion_flops(ds)[0]
    # most of a dropless decode at 512 tokens (the reference's padding runs all 256 experts besides)
    assert 0.5 < expansion / step_work(ds, dropless=True).decode_flops[0] < 1.0
    assert mla_cache_expansion_flops(c)[0] == 0.0
