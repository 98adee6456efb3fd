"""Exact parameter counts for every preset, and SPEC.md F4's 12*L*h^2 table."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import job, model, preset_names, workload

from memsweep.columns import Columns, base_params, lora_params
from memsweep.formulas.seeds import Rule4xConstants, rule4x_leading_params, rule4x_params

# Totals of the Hugging Face models (`model.num_parameters()`), as listed in issue 2 and in each
# model card / config; bert-* count HF's BertModel including its pooler.
HF_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-xl": 1_557_611_200,
    "bert-base-uncased": 109_482_240,
    "bert-large-uncased": 335_141_888,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "qwen1.5-7b": 7_721_324_544,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
}


def params_of(name: str) -> int:
    seq = min(512, model(name).max_positions)
    return int(base_params(Columns.from_specs([job(name, seq=seq)]))[0])


@pytest.mark.parametrize("name", sorted(HF_PARAMS))
def test_exact_parameter_count_matches_hf(name):
    assert params_of(name) == HF_PARAMS[name]


def test_every_real_preset_has_a_golden_count():
    assert set(preset_names("model")) - {"tiny"} == set(HF_PARAMS)


def test_tied_embeddings_remove_exactly_the_head():
    tied, untied = params_of("llama3.2-1b"), int(base_params(Columns.from_specs(
        [job(model("llama3.2-1b", tied_embeddings=False))]))[0])
    assert untied - tied == 128256 * 2048


def test_lora_count_matches_peft_for_llama2_7b():
    # PEFT's print_trainable_parameters() for Llama-2-7b, r=8 on q_proj and v_proj: 4,194,304.
    wl = workload("lora", lora_rank=8, lora_targets=("q", "v"))
    assert int(lora_params(Columns.from_specs([job("llama2-7b", wl=wl)]))[0]) == 4_194_304


def test_lora_count_follows_r_times_din_plus_dout_for_gqa():
    # SPEC.md F4: r*(d_in + d_out) per matrix; llama3-8b k_proj is 4096 -> 1024 (8 KV heads).
    wl = workload("lora", lora_rank=4, lora_targets=("k",))
    got = lora_params(Columns.from_specs([job("llama3-8b", wl=wl)]))[0]
    assert got == 32 * 4 * (4096 + 1024)


def test_rule4x_llama_table():
    # SPEC.md F4 check values: h=4096, L=32 -> 12Lh^2 = 6,442,450,944; h=5120, L=40 -> 12.58e9.
    k = Rule4xConstants()
    c = Columns.from_specs([job("llama2-7b"), job("llama2-13b")])
    lead = rule4x_leading_params(c, k)
    assert lead[0] == 6_442_450_944
    assert lead[1] == pytest.approx(12.58e9, rel=1e-3)
    # the full form adds 13Lh + Vh, still an undercount of LLaMA's 6.74B (SwiGLU 3*h*11008 MLP)
    full = rule4x_params(c, k)
    assert np.all(full > lead)
    assert full[0] == 32 * (12 * 4096**2 + 13 * 4096) + 32000 * 4096
