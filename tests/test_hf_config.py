"""The config.json importer: every model_type against the real transformers classes, the presets
it wrote, its one-line errors, the import script and `model=hf` in a real multirun."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO, model

from memsweep.columns import Columns, base_params, model_values
from memsweep.errors import ConfigError
from memsweep.hf_config import MODEL_TYPES, default_name, read_config, spec_from_config, spec_from_file, text_config
from memsweep.results import RESULTS_NAME

DATA = REPO / "tests" / "data" / "hf_configs"
CONFIGS = sorted(DATA.glob("*.json"))
# The model_types issue 10 asks the importer to map; each has at least one real config in DATA.
REQUIRED_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                  "gemma3_text", "phi3", "gpt2", "gpt_bigcode", "gpt_neox", "falcon", "starcoder2", "cohere",
                  "granite", "olmoe", "deepseek_v3", "gpt_oss", "bert"}
# Presets written by scripts/import_model.py from these files (the rest of DATA covers other types).
PRESETS = ("mixtral-8x7b", "qwen3-8b", "qwen3-30b-a3b", "qwen2.5-72b", "gemma-2-2b", "gemma-2-9b",
           "gemma-3-12b", "phi-3-mini", "mistral-nemo-12b", "gpt-oss-20b", "deepseek-v3", "llama3.1-405b",
           "starcoder2-15b", "falcon-7b", "gpt-neox-20b")


def params(spec) -> int:
    return int(base_params(Columns.from_arrays(**model_values(spec)))[0])


def test_every_required_model_type_has_a_real_config():
    types = {text_config(read_config(p))[0]["model_type"] for p in CONFIGS}
    assert REQUIRED_TYPES <= types
    assert REQUIRED_TYPES <= set(MODEL_TYPES)


@pytest.fixture(scope="module")
def hf_count():
    """num_parameters() of the real transformers model, built on the meta device (no memory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()

    def count(cfg: dict) -> int:
        inner, _ = text_config(cfg)
        mt = inner["model_type"]
        config = transformers.CONFIG_MAPPING[mt](**{k: v for k, v in inner.items() if k != "model_type"})
        with torch.device("meta"):
            m = (transformers.BertModel(config) if mt == "bert"
                 else transformers.AutoModelForCausalLM.from_config(config))
        return sum(p.numel() for p in m.parameters())

    return count


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_imported_count_equals_the_transformers_model(path, hf_count):
    assert params(spec_from_file(path)) == hf_count(read_config(path))


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_the_import_of_their_config(name):
    assert model(name) == spec_from_file(DATA / f"{name}.json", name)


def test_mla_moe_and_window_fields_of_real_configs():
    ds = spec_from_file(DATA / "deepseek-v3.json")
    assert (ds.kv_lora_rank, ds.q_lora_rank, ds.dim_per_head, ds.rope_head_dim, ds.value_dim) == (512, 1536, 192, 64, 128)
    assert (ds.experts, ds.experts_per_token, ds.dense_layers, ds.shared_experts, ds.moe_layers) == (256, 8, 3, 1, 58)
    g3 = spec_from_file(DATA / "gemma-3-12b.json")
    assert g3.layer_kinds()[:6] == ("local",) * 5 + ("global",) and g3.local_layers == 40
    assert (g3.sliding_window, g3.block_norms, g3.qk_norm, g3.mlp) == (1024, 4, "head", "geglu")
    oss = spec_from_file(DATA / "gpt-oss-20b.json")
    assert oss.layer_pattern == ("local", "global") and oss.attention_sinks and oss.router_bias
    falcon = spec_from_file(DATA / "falcon-7b.json")
    assert (falcon.kv_heads, falcon.block, falcon.block_norms) == (1, "parallel", 1)
    assert spec_from_file(DATA / "santacoder.json").kv_heads == 1  # GPT-BigCode multi-query
    neox = spec_from_file(DATA / "gpt-neox-20b.json")
    assert (neox.block, neox.rotary_fraction) == ("parallel", 0.25)
    assert spec_from_file(DATA / "mistral-7b-v0.1.json").layer_pattern == ("local",)
    assert spec_from_file(DATA / "qwen2.5-72b.json").sliding_window == 0  # use_sliding_window false


def _cfg(name: str, **changes) -> dict:
    return {**read_config(DATA / f"{name}.json"), **changes}


@pytest.mark.parametrize("cfg,key", [
    (_cfg("llama3.2-1b", model_type="mamba"), "model_type"),
    (_cfg("llama3.2-1b", attention_kind="linear"), "attention_kind"),
    (_cfg("falcon-7b", alibi=True), "alibi"),
    (_cfg("llama3.2-1b", hidden_act="relu"), "hidden_act"),
    (_cfg("deepseek-v3", attention_bias=True), "attention_bias"),
    (_cfg("starcoder2-15b", mlp_type="moe"), "mlp_type"),
    ({k: v for k, v in _cfg("llama3.2-1b").items() if k != "hidden_size"}, "hidden_size"),
    (_cfg("gemma-2-9b", layer_types=["full_attention"] * 3), "layer_types"),
    (_cfg("gemma-3-12b", text_config={"model_type": "gemma3_text", "window_kind": "chunked"}),
     "text_config.window_kind"),
])
def test_what_the_importer_cannot_map_is_a_one_line_error_naming_the_key(cfg, key):
    with pytest.raises(ConfigError) as err:
        spec_from_config(cfg, "x")
    assert err.value.key == key and "\n" not in str(err.value)


def test_bad_paths_and_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.config="):
        spec_from_file(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^model.config=.*JSONDecodeError"):
        spec_from_file(tmp_path)


def test_names_come_from_the_snapshot_folder(tmp_path):
    snap = tmp_path / "models--Qwen--Qwen3-8B" / "snapshots" / "abc123"
    assert default_name(_write(tmp_path / "My Model_v2", "qwen3-8b")) == "my-model_v2"
    assert default_name(_write(tmp_path / "models--Qwen--Qwen3-8B", "qwen3-8b")) == "qwen3-8b"
    assert default_name(_write(snap, "qwen3-8b").parent) == "abc123"


def _write(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / f"{name}.json", folder / "config.json")
    return folder / "config.json"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_import_script_writes_a_preset_and_keeps_an_existing_one(tmp_path):
    conf = tmp_path / "conf"
    folder = _write(tmp_path / "Mixtral-8x7B", "mixtral-8x7b").parent
    proc = run("scripts/import_model.py", str(folder), "--conf-dir", str(conf))
    assert proc.returncode == 0, proc.stderr
    assert "46,702,792,704 parameters (12,879,925,248 active per token)" in proc.stdout
    written = conf / "model" / "mixtral-8x7b.yaml"
    import yaml

    from memsweep.specs import ModelSpec, model_fields
    assert ModelSpec(**model_fields(yaml.safe_load(written.read_text()))) == replace(
        model("mixtral-8x7b"), name="mixtral-8x7b")
    before = written.read_text()
    again = run("scripts/import_model.py", str(folder), "--conf-dir", str(conf))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--force" in again.stderr
    assert written.read_text() == before
    bad = run("scripts/import_model.py", str(tmp_path / "none"), "--conf-dir", str(conf))
    assert bad.returncode == 2 and bad.stderr.startswith("error: model.config=")


def test_sweep_model_hf_reads_config_files_at_run_time(tmp_path):
    a = _write(tmp_path / "ckpt-a", "qwen3-30b-a3b")
    b = _write(tmp_path / "ckpt-b", "gemma-2-2b")
    out = tmp_path / "sweep"
    proc = run("sweep.py", "-m", "model=hf", f"model.config={a},{b}", "seq=1024", "formulas=[detailed]",
               f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, proc.stderr
    t = pl.read_parquet(out / RESULTS_NAME).sort("model")
    assert t["model"].to_list() == ["ckpt-a", "ckpt-b"] and set(t["status"]) == {"ok"}
    assert t["params"].to_list() == [30_532_122_624, 2_614_341_888]
    assert t["active_params"].to_list() == [3_353_032_704, 2_614_341_888]
    spec = json.loads(t["spec_json"][0])["model"]
    assert spec["experts"] == 128 and spec["name"] == "ckpt-a"


@pytest.mark.parametrize("name", PRESETS)
def test_specs_of_new_presets_round_trip_through_spec_json(name):
    from conftest import job

    from memsweep.specs import JobSpec
    spec = job(name, seq=512, wl="lora")
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_the_planner_accepts_the_new_presets():
    from memsweep.plan import PlanSpec, make_plan

    plan = make_plan(PlanSpec(models=("mixtral-8x7b", "deepseek-v3", "gemma-2-2b"), hardware=("h100-80g",),
                              seqs=(2048,), workloads=("lora", "inference")))
    t = plan.table
    assert set(t["model"]) == {"mixtral-8x7b", "deepseek-v3", "gemma-2-2b"}
    t = t.filter(pl.col("rank") == 1)  # the answers (rank 2: the runner-ups)
    gemma = t.filter((pl.col("model") == "gemma-2-2b") & (pl.col("question") == "max_batch"))
    assert gemma.height == 2 and (gemma["status"] == "ok").all() and (gemma["batch"] >= 1).all()
    # DeepSeek-V3 (1.25 TB of bf16 weights) needs many GPUs: the fewest-GPUs answer is > 8 GPUs
    ds = t.filter((pl.col("model") == "deepseek-v3") & (pl.col("question") == "max_batch"))
    assert (ds["status"] == "none_fits").all()
