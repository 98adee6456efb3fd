"""Exact parameter counts for every preset, and docs/formulas.md F4's 12*L*h^2 table."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import job, model, preset_names, workload

from memsweep.columns import Columns, active_params, base_params, lora_params, routed_expert_params
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
    # Issue 10 presets: the Hugging Face Hub's safetensors total ("Model size") where it is the
    # parameter count, else the model card / paper; tests/data/hf_configs/SOURCES.md has each source.
    # Every one also equals transformers 5.23.0's num_parameters() (tests/test_hf_config.py).
    "mixtral-8x7b": 46_702_792_704,       # model card: 46.7B total
    "qwen3-8b": 8_190_735_360,            # HF safetensors total
    "qwen3-30b-a3b": 30_532_122_624,      # HF safetensors total
    "qwen2.5-72b": 72_706_203_648,        # HF safetensors total
    "gemma-2-2b": 2_614_341_888,          # HF safetensors total
    "gemma-2-9b": 9_241_705_984,          # HF safetensors total
    "gemma-3-12b": 11_766_034_176,        # language model of the 12.2B checkpoint (vision tower aside)
    "phi-3-mini": 3_821_079_552,          # HF safetensors total
    "mistral-nemo-12b": 12_247_782_400,   # transformers count (the Hub lists 705,536 fewer)
    "gpt-oss-20b": 20_914_757_184,        # OpenAI model card: 20.91B total
    "deepseek-v3": 671_026_404_352,       # DeepSeek-AI 2024: 671B (HF: + 14,848 bias buffers)
    "llama3.1-405b": 405_853_388_800,     # HF safetensors total
    "starcoder2-15b": 15_957_889_024,     # transformers count (model card: 15B)
    "falcon-7b": 6_921_720_704,           # HF safetensors total of the tied model (model card: 7B)
    "gpt-neox-20b": 20_554_567_680,       # transformers count (Black et al. 2022: 20B)
}

# Active parameters per token of the MoE presets (total less the (E - k) idle experts per layer).
ACTIVE_PARAMS = {
    "mixtral-8x7b": 12_879_925_248,   # model card: 12.9B active
    "qwen3-30b-a3b": 3_353_032_704,   # model card: 3.3B activated
    "deepseek-v3": 37_552_282_624,    # DeepSeek-AI 2024: 37B activated
    # OpenAI's 3.61B active excludes the embedding table: 4,187,440,704 - 201,088 * 2,880.
    "gpt-oss-20b": 3_608_307_264 + 201_088 * 2_880,
}


def params_of(name: str) -> int:
    seq = min(512, model(name).max_positions)
    return int(base_params(Columns.from_specs([job(name, seq=seq)]))[0])


@pytest.mark.parametrize("name", sorted(HF_PARAMS))
def test_exact_parameter_count_matches_hf(name):
    assert params_of(name) == HF_PARAMS[name]


@pytest.mark.parametrize("name", sorted(ACTIVE_PARAMS))
def test_active_parameters_of_moe_presets(name):
    c = Columns.from_specs([job(name, seq=512)])
    assert int(active_params(c)[0]) == ACTIVE_PARAMS[name]
    assert int(routed_expert_params(c)[0]) > int(base_params(c)[0]) - ACTIVE_PARAMS[name]


def test_dense_models_are_all_active():
    c = Columns.from_specs([job("llama3-8b", seq=512)])
    assert active_params(c)[0] == base_params(c)[0] and routed_expert_params(c)[0] == 0


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
    # docs/formulas.md F4: r*(d_in + d_out) per matrix; llama3-8b k_proj is 4096 -> 1024 (8 KV heads).
    wl = workload("lora", lora_rank=4, lora_targets=("k",))
    got = lora_params(Columns.from_specs([job("llama3-8b", wl=wl)]))[0]
    assert got == 32 * 4 * (4096 + 1024)


def test_rule4x_llama_table():
    # docs/formulas.md F4 check values: h=4096, L=32 -> 12Lh^2 = 6,442,450,944; h=5120, L=40 -> 12.58e9.
    k = Rule4xConstants()
    c = Columns.from_specs([job("llama2-7b"), job("llama2-13b")])
    lead = rule4x_leading_params(c, k)
    assert lead[0] == 6_442_450_944
    assert lead[1] == pytest.approx(12.58e9, rel=1e-3)
    # the full form adds 13Lh + Vh, still an undercount of LLaMA's 6.74B (SwiGLU 3*h*11008 MLP)
    full = rule4x_params(c, k)
    assert np.all(full > lead)
    assert full[0] == 32 * (12 * 4096**2 + 13 * 4096) + 32000 * 4096
