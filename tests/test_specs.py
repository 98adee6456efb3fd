"""Bad input fails at the spec boundary with one line naming the key, the value and what is allowed."""

from __future__ import annotations

import pytest
from conftest import job, model, workload

from memsweep.errors import ConfigError
from memsweep.specs import Hardware, Parallel

BAD = [
    ("seq", 0, lambda: job(seq=0)),
    ("batch", -1, lambda: job(batch=-1)),
    ("dtype", "fp12", lambda: job(dtype="fp12")),
    ("model.heads", 7, lambda: model("llama2-7b", heads=7)),
    ("model.kv_heads", 5, lambda: model("llama2-7b", kv_heads=5)),
    ("dtype", "int4", lambda: job(dtype="int4")),
    ("dtype", "int8", lambda: job(wl="lora", dtype="int8")),
    ("precision", "half", lambda: job(precision="half")),
    ("recompute", "some", lambda: job(recompute="some")),
    ("attention", "flash3", lambda: job(attention="flash3")),
    ("model.norm", "batchnorm", lambda: model("gpt2", norm="batchnorm")),
    ("model.layers", "32", lambda: model("gpt2", layers="32")),
    ("seq", 2048, lambda: job("gpt2", seq=2048)),
    ("workload.gen_tokens", 100, lambda: job("gpt2", wl=workload("inference", gen_tokens=100), seq=1000)),
    ("parallel.tp", 3, lambda: job(parallel=Parallel("p", tp=3))),
    ("parallel.pp", 500, lambda: job(parallel=Parallel("p", pp=500))),
    ("parallel.zero", 4, lambda: Parallel("p", zero=4)),
    ("workload.lora_targets", "gate", lambda: job("gpt2", wl=workload("lora", lora_targets=("q", "gate")), seq=512)),
    ("workload.lora_targets", "ffn", lambda: workload("lora", lora_targets=("ffn",))),
    ("workload.lora_rank", 0, lambda: workload("lora", lora_rank=0)),
    ("hardware.reserved_mib", 5000, lambda: Hardware("x", memory_mib=4096, reserved_mib=5000)),
    # issue 10: the architecture fields
    ("model.head_dim", 0, lambda: model("gemma-2-9b", head_dim=0)),
    ("model.head_dim", 127, lambda: model("qwen3-8b", head_dim=127)),  # odd: RoPE rotates pairs
    ("model.mlp", "reglu", lambda: model("llama2-7b", mlp="reglu")),
    ("model.block", "fused", lambda: model("falcon-7b", block="fused")),
    ("model.block_norms", 4, lambda: model("falcon-7b", block_norms=4)),
    ("model.block_norms", 1, lambda: model("llama2-7b", block_norms=1)),
    ("model.qk_norm", "layer", lambda: model("qwen3-8b", qk_norm="layer")),
    ("model.experts_per_token", 9, lambda: model("mixtral-8x7b", experts_per_token=9)),
    ("model.experts_per_token", 2, lambda: model("llama2-7b", experts_per_token=2)),
    ("model.dense_layers", 61, lambda: model("deepseek-v3", dense_layers=61)),
    ("model.shared_expert_gate", True, lambda: model("mixtral-8x7b", shared_expert_gate=True)),
    ("model.layer_pattern", "local", lambda: model("gemma-2-9b", layer_pattern="local")),
    ("model.layer_pattern", "sliding", lambda: model("gemma-2-9b", layer_pattern=("sliding", "global"))),
    ("model.sliding_window", 0, lambda: model("gemma-2-9b", sliding_window=0)),
    ("model.rope_head_dim", 192, lambda: model("deepseek-v3", rope_head_dim=192)),
    ("model.v_head_dim", 128, lambda: model("llama2-7b", v_head_dim=128)),
    ("model.mla_cache", "compressed", lambda: model("deepseek-v3", mla_cache="compressed")),
    ("model.rotary_fraction", 1.5, lambda: model("gpt-neox-20b", rotary_fraction=1.5)),
    ("model.family", "bert", lambda: model("mixtral-8x7b", family="bert")),
    ("parallel.ep", 3, lambda: job("mixtral-8x7b", parallel=Parallel("p", dp=3, ep=3))),
    ("parallel.ep", 2, lambda: job("llama2-7b", parallel=Parallel("p", dp=2, ep=2))),
    ("parallel.ep", 4, lambda: Parallel("p", dp=2, ep=4)),
    ("workload.lora_targets", "gate", lambda: job("falcon-7b", wl=workload("lora", lora_targets=("q", "gate")))),
    # issue 14: the share of usable memory a job leaves free
    ("margin", 2, lambda: job(margin=2)),
    ("margin", 1.0, lambda: job(margin=1.0)),
    ("margin", -0.1, lambda: job(margin=-0.1)),
    ("margin", "5%", lambda: job(margin="5%")),
]


@pytest.mark.parametrize("key,value,make", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_value_names_key_value_and_allowed(key, value, make):
    with pytest.raises(ConfigError) as info:
        make()
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{key}={value!r}: ")
    assert "allowed: " in msg and msg.split("allowed: ", 1)[1].strip()


def test_kv_heads_error_lists_the_divisors():
    with pytest.raises(ConfigError, match=r"1, 2, 4, 8, 16, 32$"):
        model("llama2-7b", kv_heads=5)


def test_fp32_training_is_pure_and_inference_is_never_mixed():
    assert job(dtype="fp32").effective_precision == "pure"
    assert job(wl="inference").effective_precision == "pure"
    assert job(dtype="bf16").effective_precision == "mixed"


def test_encoders_have_no_decode_phase():
    assert job("bert-base-uncased", wl="inference", seq=256).gen_tokens == 0
    assert job("llama2-7b", wl="inference", seq=256).gen_tokens == 128


def test_explicit_head_dim_and_patterns():
    g = model("gemma-2-9b")
    assert g.heads * g.dim_per_head == 4096 != g.hidden
    assert g.layer_kinds()[:4] == ("local", "global", "local", "global") and g.local_layers == 21
    assert model("mistral-7b", layer_pattern=("local",), sliding_window=4096).local_layers == 32
    assert model("llama2-7b").local_layers == 0
