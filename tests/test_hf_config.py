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
from memsweep.hf_config import (
    MODEL_TYPES, WRAPPERS, default_name, import_config, read_config, spec_from_config, spec_from_file, text_config,
)
from memsweep.results import RESULTS_NAME

DATA = REPO / "tests" / "data" / "hf_configs"
CONFIGS = sorted(DATA.glob("*.json"))
# The model_types issue 10 asks the importer to map; each has at least one real config in DATA.
REQUIRED_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                  "gemma3_text", "phi3", "gpt2", "gpt_bigcode", "gpt_neox", "falcon", "starcoder2", "cohere",
                  "granite", "olmoe", "deepseek_v3", "gpt_oss", "bert",
                  # issue 27: Llama-4's text model, OLMo-2, DeepSeek-V2, GLM-4, the Qwen-VL text models
                  "llama4_text", "olmo2", "deepseek_v2", "glm4", "qwen2_vl_text", "qwen2_5_vl_text"}
# ... and the multimodal configs whose text_config (or flat text keys) the importer reads
REQUIRED_WRAPPERS = {"gemma3", "llama4", "mistral3", "qwen2_vl", "qwen2_5_vl"}
# Presets written by scripts/import_model.py from these files (the rest of DATA covers other types).
PRESETS = ("mixtral-8x7b", "qwen3-8b", "qwen3-30b-a3b", "qwen2.5-72b", "gemma-2-2b", "gemma-2-9b",
           "gemma-3-12b", "phi-3-mini", "mistral-nemo-12b", "gpt-oss-20b", "deepseek-v3", "llama3.1-405b",
           "starcoder2-15b", "falcon-7b", "gpt-neox-20b")


def params(spec) -> int:
    return int(base_params(Columns.from_arrays(**model_values(spec)))[0])


def test_every_required_model_type_has_a_real_config():
    types = {text_config(read_config(p))[0]["model_type"] for p in CONFIGS}
    assert REQUIRED_TYPES <= types
    assert REQUIRED_WRAPPERS <= {read_config(p)["model_type"] for p in CONFIGS}
    assert REQUIRED_TYPES <= set(MODEL_TYPES)


@pytest.fixture(scope="module")
def hf_count():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memsweep.hf_keys import transformers_count

    return transformers_count


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
    (_cfg("falcon-7b", alibi=True), "alibi"),
    (_cfg("llama3.2-1b", hidden_act="relu"), "hidden_act"),
    (_cfg("deepseek-v3", attention_bias=True), "attention_bias"),
    (_cfg("starcoder2-15b", mlp_type="moe"), "mlp_type"),
    (_cfg("gemma-2-9b", layer_types=["full_attention"] * 3), "layer_types"),
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


@pytest.mark.parametrize("args,key", [
    (["--name", "../../x"], "--name"),
    (["--name", "a/b"], "--name"),
    (["--name", ""], "--name"),
    (["--conf-dir", "/proc/memsweep"], "--conf-dir"),
])
def test_import_never_writes_outside_its_folder_and_fails_in_one_line(tmp_path, args, key, capsys):
    from memsweep.app.main import main

    cwd = tmp_path / "work"
    cwd.mkdir()
    extra = [] if "--conf-dir" in args else ["--conf-dir", str(cwd / "conf")]
    assert main(["import", str(DATA / "llama3.2-1b.json"), *extra, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}=") and err.count("\n") == 1
    assert not any(p.suffix == ".yaml" for p in tmp_path.rglob("*"))


def test_import_warns_once_of_unknown_keys(tmp_path, capsys):
    from memsweep.app.main import main

    cfg = {**read_config(DATA / "phi-4-mini.json")}
    path = _write(tmp_path / "phi", "phi-4-mini")
    assert main(["import", str(path), "--print"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# Imported from ") and "name: phi" in captured.out
    warning = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "lm_head_bias" in warning[0] and cfg["lm_head_bias"] is False


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


# --- issue 27: every real config.json, in both forms a user meets --------------------------------
FULL = DATA / "full"
COUNTS = json.loads((DATA.parent / "hf_config_counts.json").read_text())


def test_the_corpus_has_forty_real_configs_each_in_both_forms_with_a_count():
    assert len(CONFIGS) >= 40
    assert {p.name for p in FULL.glob("*.json")} == {p.name for p in CONFIGS}
    assert set(COUNTS) == {p.stem for p in CONFIGS}
    sources = (DATA / "SOURCES.md").read_text()
    assert all(f"| {p.name} |" in sources for p in CONFIGS)  # each file's provenance is stated


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_both_forms_import_to_the_transformers_count_and_the_full_one_adds_no_unknown_key(path):
    """The hub file and transformers' to_dict() of it (generic keys, every class key at its
    default, derived keys written out) give one spec, whose count is transformers' own
    (hf_config_counts.json, written by scripts/hf_corpus.py from the meta-device model). The
    full form's unknown keys are the hub file's own (remote-code extras transformers keeps)."""
    hub, hub_unknown = import_config(read_config(path), path.stem)
    full, unknown = import_config(read_config(FULL / path.name), path.stem)
    assert hub == full and unknown == hub_unknown
    assert params(hub) == COUNTS[path.stem]


def test_the_key_table_is_what_transformers_says(hf_count):
    """src/memsweep/data/hf_keys.json regenerated from the installed transformers is the file."""
    from memsweep.hf_keys import build_table, load_table

    assert build_table() == load_table()


def test_the_key_table_covers_every_supported_type_and_reads_every_derived_key():
    from memsweep.hf_keys import load_table

    table = load_table()
    assert set(table["types"]) == set(MODEL_TYPES) | set(WRAPPERS)
    for mt, keys in table["types"].items():
        for key, row in keys.items():
            assert row["kind"] in ("read", "neutral", "dropout", "vision", "memory"), (mt, key)
            if "saved" in row:  # __post_init__ derives it: the importer must read it, not compare it
                assert row["kind"] in ("read", "neutral", "dropout", "vision"), (mt, key)


def test_unknown_keys_are_one_warning_line_and_the_import_goes_on():
    lines = []
    cfg = _cfg("llama3.2-1b", attention_kind="linear", unsloth_fixed=True)
    spec = spec_from_config(cfg, "x", warn=lines.append)
    assert spec == spec_from_config(_cfg("llama3.2-1b"), "x")
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "attention_kind" in lines[0] and "unsloth_fixed" in lines[0] and lines[0].startswith("warning:")


@pytest.mark.parametrize("name,changes", [
    ("llama3.2-1b", dict(id2label={"0": "A"}, label2id={"A": 0}, problem_type="regression",
                         output_hidden_states=True, return_dict=False, torchscript=False,
                         chunk_size_feed_forward=0, is_encoder_decoder=False, classifier_dropout=0.1,
                         router_jitter_noise=0.2, use_cache=False, max_length=77, pruned_heads={})),
    ("mixtral-8x7b", dict(router_jitter_noise=0.01, output_router_logits=True)),
    ("deepseek-v3", dict(qk_head_dim=192)),
    ("gpt-oss-20b", dict(swiglu_alpha=1.702)),
    ("falcon-7b", dict(activation="gelu")),
    ("gemma-3-12b", dict(text_config={**read_config(DATA / "gemma-3-12b.json")["text_config"],
                                      "use_bidirectional_attention": None})),
])
def test_memory_neutral_keys_and_class_defaults_are_accepted(name, changes):
    assert import_config(_cfg(name, **changes), "x") == import_config(_cfg(name), "x")


@pytest.mark.parametrize("cfg,key", [
    (_cfg("bert-base-uncased", chunk_size_feed_forward=64), "chunk_size_feed_forward"),
    (_cfg("llama3.2-1b", is_encoder_decoder=True), "is_encoder_decoder"),
    (_cfg("gpt2", add_cross_attention=True), "add_cross_attention"),
    (_cfg("llama3.2-1b", pruned_heads={"0": [1, 2]}), "pruned_heads"),
    (_cfg("deepseek-v3", qk_head_dim=128), "qk_head_dim"),
    (_cfg("falcon-7b", activation="relu"), "activation"),
    (_cfg("llama3.2-1b", num_key_value_heads=0), "num_key_value_heads"),
    (_cfg("qwen3-8b", head_dim=0), "head_dim"),
    (_cfg("llama3.2-1b", num_hidden_layers=32.5), "num_hidden_layers"),
    (_cfg("llama3.2-1b", num_hidden_layers="32"), "num_hidden_layers"),
    (_cfg("llama3.2-1b", num_hidden_layers=None), "num_hidden_layers"),
    (_cfg("llama3.2-1b", num_hidden_layers=1e12), "num_hidden_layers"),
    (_cfg("llama3.2-1b", num_hidden_layers=10**12), "num_hidden_layers"),
    (_cfg("llama3.2-1b", hidden_size=True), "hidden_size"),
    (_cfg("mixtral-8x7b", num_experts_per_tok=9), "num_experts_per_tok"),
    (_cfg("gemma-2-2b", final_logit_softcapping=-1), "final_logit_softcapping"),
    (_cfg("qwen2-vl-7b", text_config=[1]), "text_config"),
])
def test_a_value_that_changes_memory_unmodelled_or_broken_is_a_one_line_error(cfg, key):
    with pytest.raises(ConfigError) as err:
        import_config(cfg, "x")
    assert err.value.key == key and "\n" not in str(err.value)


def test_deeply_nested_json_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match=r"^model.config=.*RecursionError"):
        spec_from_file(tmp_path)


def test_multimodal_configs_size_their_language_model():
    scout = spec_from_file(DATA / "llama4-scout-17b-16e.json")
    maverick = spec_from_file(DATA / "llama4-maverick-17b-128e.json")
    assert (scout.experts, scout.dense_layers, scout.shared_experts, scout.qk_norm) == (16, 0, 1, "l2")
    assert (maverick.experts, maverick.dense_layers) == (128, 24)  # MoE every other layer
    assert scout.layer_pattern == ("local",) * 3 + ("global",) and scout.sliding_window == 8192  # chunked
    assert spec_from_file(DATA / "qwen2.5-vl-7b.json") == replace(  # the flat hub file's text model
        spec_from_file(DATA / "qwen2-7b.json"), name="qwen2.5-vl-7b", max_positions=128000)
    assert spec_from_file(DATA / "glm4-32b-0414.json").block_norms == 4
    assert spec_from_file(DATA / "olmo2-7b.json").qk_norm == "full"
    assert spec_from_file(DATA / "deepseek-v2-lite.json").q_lora_rank == 0
    g2 = spec_from_file(DATA / "gemma-2-9b.json")
    assert (g2.attn_softcap, g2.final_softcap) == (50.0, 30.0)


# transformers 4.x's PretrainedConfig.to_dict() wrote these generic keys at their defaults too
LEGACY_TO_DICT = dict(
    return_dict=True, output_hidden_states=False, output_attentions=False, torchscript=False, torch_dtype="bfloat16",
    use_bfloat16=False, tf_legacy_loss=False, pruned_heads={}, tie_word_embeddings=False, chunk_size_feed_forward=0,
    is_encoder_decoder=False, is_decoder=False, cross_attention_hidden_size=None, add_cross_attention=False,
    tie_encoder_decoder=False, max_length=20, min_length=0, do_sample=False, early_stopping=False, num_beams=1,
    num_beam_groups=1, diversity_penalty=0.0, temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0,
    repetition_penalty=1.0, length_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
    bad_words_ids=None, num_return_sequences=1, output_scores=False, return_dict_in_generate=False,
    forced_bos_token_id=None, forced_eos_token_id=None, remove_invalid_values=False,
    exponential_decay_length_penalty=None, suppress_tokens=None, begin_suppress_tokens=None,
    architectures=["LlamaForCausalLM"], finetuning_task=None, id2label={"0": "LABEL_0", "1": "LABEL_1"},
    label2id={"LABEL_0": 0, "LABEL_1": 1}, tokenizer_class=None, prefix=None, sep_token_id=None,
    decoder_start_token_id=None, task_specific_params=None, problem_type=None, _name_or_path="x",
    _commit_hash=None, _attn_implementation_autoset=True, transformers_version="4.46.0",
    rope_scaling=None, rope_theta=500000.0)


def test_a_transformers_4_full_save_imports_without_a_warning():
    cfg = {**LEGACY_TO_DICT, **read_config(DATA / "llama3.1-8b.json")}
    cfg.update({k: v for k, v in LEGACY_TO_DICT.items() if k not in ("architectures", "torch_dtype", "rope_theta",
                                                                       "rope_scaling", "tie_word_embeddings")})
    spec, unknown = import_config(cfg, "x")
    assert unknown == [] and spec == import_config(read_config(DATA / "llama3.1-8b.json"), "x")[0]
