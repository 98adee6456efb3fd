"""Every config option composes through Hydra and converts to a valid spec."""

from __future__ import annotations

import pytest
from conftest import CONF, load_preset, preset_names

from memsweep.app.cli import GROUPS, check_overrides
from memsweep.app.convert import to_job_spec
from memsweep.errors import ConfigError
from memsweep.formulas import FORMULAS

OPTIONS = [(g, n) for g in GROUPS for n in preset_names(g)]


def test_defaults_are_the_documented_ones(compose_config):
    spec = to_job_spec(compose_config())
    assert (spec.model.name, spec.workload.kind, spec.optimizer.name, spec.precision, spec.dtype,
            spec.seq, spec.batch) == ("llama2-7b", "train", "adamw", "mixed", "bf16", 2048, 1)
    assert spec.formulas == tuple(FORMULAS)


@pytest.mark.parametrize("group,name", OPTIONS, ids=[f"{g}={n}" for g, n in OPTIONS])
def test_every_option_composes_and_converts(compose_config, group, name):
    overrides = [f"{group}={name}", "seq=256"]
    if group == "parallel":
        overrides.append("model=llama2-70b")  # 64 heads, 8 KV heads, 80 layers: every layout divides
    spec = to_job_spec(compose_config(*overrides))
    if group == "formula":
        assert spec.formulas[-1] == name and spec.formulas.count(name) == 1
    else:
        assert getattr(spec, group).name == name


@pytest.mark.parametrize("group", GROUPS)
def test_name_equals_file_name(group):
    for name in preset_names(group):
        assert load_preset(group, name)["name"] == name


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_used_by_dtypes_compose(compose_config, dtype):
    assert to_job_spec(compose_config(f"dtype={dtype}", "seq=8192")).dtype == dtype


def test_unknown_preset_key_in_a_group_is_refused(compose_config):
    cfg = compose_config("+model.hidden_size=5")
    with pytest.raises(ConfigError, match=r"^model.hidden_size=5: .*allowed: known keys: "):
        to_job_spec(cfg)


@pytest.mark.parametrize("argv,key", [
    (["model=nosuch"], "model"),
    (["-m", "model=gpt2,nosuch", "seq=512"], "model"),
    (["hardware=h100"], "hardware"),
    (["model.hiden=3"], "model.hiden"),
    (["sq=5"], "sq"),
    # a key every selected preset must have: model=hf carries only name and config
    (["-m", "model=llama2-7b,hf", "model.layers=3"], "model.layers"),
])
def test_command_line_precheck(argv, key):
    with pytest.raises(ConfigError) as info:
        check_overrides(argv, CONF)
    assert str(info.value).startswith(f"{key}=") and "\n" not in str(info.value)


@pytest.mark.parametrize("argv", [
    ["-m", "seq=512,2048,8192", "dtype=fp16,bf16"],
    ["model=gpt2", "model.layers=2", "+resume=true", "hydra/launcher=basic"],
    ["-m", "model=glob(llama*)"],
    ["-m", "model=mixtral-8x7b,gemma-2-9b", "model.experts=4", "parallel=zero1", "parallel.ep=2"],
])
def test_command_line_precheck_passes_valid_overrides(argv):
    check_overrides(argv, CONF)


def test_model_hf_composes_from_a_config_file(compose_config):
    path = CONF.parent / "tests" / "data" / "hf_configs" / "qwen3-8b.json"
    spec = to_job_spec(compose_config("model=hf", f"model.config={path}", "seq=256"))
    assert spec.model.name == "qwen3-8b" and spec.model.qk_norm == "head"
    named = to_job_spec(compose_config("model=hf", f"model.config={path}", "model.name=mine"))
    assert named.model.name == "mine"


def test_model_hf_without_a_readable_config_is_one_line(compose_config, tmp_path):
    with pytest.raises(ConfigError, match=r"^model.config="):
        to_job_spec(compose_config("model=hf", f"model.config={tmp_path / 'none.json'}"))
    with pytest.raises(ConfigError, match=r"^model.layers="):
        to_job_spec(compose_config("model=hf", f"model.config={tmp_path}", "+model.layers=2"))


def test_every_model_preset_spells_out_every_field():
    """Hydra can only override a key a preset has: with every ModelSpec field in every preset,
    `model.experts=16` or `model.sliding_window=4096` works on any model."""
    from dataclasses import fields

    from memsweep.specs import ModelSpec
    names = {f.name for f in fields(ModelSpec)} - {"source", "unmodelled"}  # set by model=hf model.config=PATH only
    for name in preset_names("model"):
        assert set(load_preset("model", name)) == names, name
