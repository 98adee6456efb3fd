"""measure.impl=hf (issue 12, first part): the transformers model, measured like the reference.

Parameter counts of the built model equal memsweep's analytic ones, fake == cpu byte for byte on
tiny configs of each supported config class, and what is not supported yet is a skipped row that
says why (never a guess)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from conftest import job, model, same_phases, workload

from memsweep.estimate import model_summary
from memsweep.results import RESULTS_NAME
from memsweep.specs import MeasureSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from memsweep.measure.backends import measure  # noqa: E402
from memsweep.measure.hf import hf_config  # noqa: E402


def hf(backend: str) -> MeasureSpec:
    # fake with the CPU's SDPA kernels, as cpu runs them: the two agree byte for byte
    return MeasureSpec(name=backend, backend=backend, impl="hf", sdpa="device")


@pytest.mark.parametrize("name", ["llama2-7b", "llama3-8b", "qwen2.5-7b", "mistral-7b", "gpt2", "tiny"])
def test_the_transformers_model_has_the_presets_parameter_count(name):
    m = model(name)
    with torch.device("meta"):
        built = transformers.AutoModelForCausalLM.from_config(hf_config(m))
    assert sum(p.numel() for p in built.parameters()) == model_summary(m)["params"]


TINY = model("tiny")
TINY_MODELS = {
    "llama": TINY,
    "qwen2": replace(TINY, qkv_bias=True),
    "mistral": replace(TINY, sliding_window=8, layer_pattern=("local",)),
    "gpt2": replace(model("gpt2"), layers=2, hidden=64, heads=4, kv_heads=4, ffn=256, vocab=300, max_positions=128),
}
MODES = {
    "train-pure": dict(precision="pure"),
    "train-mixed-full": dict(precision="mixed", recompute="full"),
    "train-mixed-eager": dict(precision="mixed", attention="eager"),
    "lora-mixed": dict(precision="mixed", wl=workload("lora", lora_rank=4, lora_targets=("q", "k", "v", "o", "up", "down"))),
    "inference": dict(wl=workload("inference", gen_tokens=4)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", TINY_MODELS)
def test_fake_equals_cpu_byte_for_byte(kind, mode):
    runs = {}
    for backend in ("fake", "cpu"):
        m = measure(job(TINY_MODELS[kind], seq=16, batch=2, dtype="bf16", measure=hf(backend), **MODES[mode]))
        assert m.status == "ok", m.error
        runs[backend] = m
    fake, cpu = runs["fake"], runs["cpu"]
    # (under full recompute the phase peaks differed by 0.03 % with CPU autocast's own cast policy;
    # with CUDA's, measure/autocast.py, they are equal too)
    assert (fake.peak_bytes, fake.breakdown) == (cpu.peak_bytes, cpu.breakdown)
    same_phases(fake, cpu)


SHIPPED_DIR = Path(__file__).parents[1] / "src" / "memsweep" / "data" / "hf_configs"
SHIPPED = sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))


def test_every_preset_transformers_builds_has_its_config_json_shipped():
    """Issue 25, part 2: a preset hf_config cannot build from its fields (MoE, MLA, Gemma, Falcon,
    GPT-NeoX, Starcoder2, Qwen3) ships the config.json it was imported from (memsweep/data/
    hf_configs; the test corpus links to those files, one copy); one it can, ships none."""
    from memsweep.measure.hf import unsupported
    from memsweep.presets import preset_names

    needed = {n for n in preset_names("model") if n != "hf" and model(n).family != "bert" and unsupported(model(n))}
    assert set(SHIPPED) == needed
    corpus = Path(__file__).parent / "data" / "hf_configs"
    assert all((corpus / f"{n}.json").resolve() == SHIPPED_DIR / f"{n}.json" for n in SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_family_builds_with_the_presets_parameter_count(name):
    """MoE (Mixtral, Qwen3-MoE, gpt-oss, DeepSeek-V3), Falcon, GPT-NeoX, Gemma-2/3, Phi-3,
    Starcoder2: the preset's config.json, and cut to two layers (as a sweep may cut it)."""
    from memsweep.measure.hf import auto_class

    full = model(name)
    cut = replace(full, layers=max(2, len(full.layer_pattern)), dense_layers=min(full.dense_layers, 1))
    for m in (full, cut):
        cfg = hf_config(m)
        with torch.device("meta"):
            built = auto_class(transformers, cfg).from_config(cfg)
        assert sum(p.numel() for p in built.parameters()) == model_summary(m)["params"], m.layers


def test_mixed_precision_moe_runs_its_experts_in_fp32_as_cuda_does():
    """transformers' experts run grouped_mm(input.to(weight.dtype), weight) outside autocast; CUDA
    runs it for fp32 (its fallback loop) and the meta kernel used to refuse it. Measured now, and
    the reference model does the same: fp32 expert activations, no 16-bit expert-weight copies."""
    cut = replace(model("qwen3-30b-a3b"), layers=1)
    runs = {}
    for prec in ("mixed", "pure"):
        for impl in ("reference", "hf"):
            ms = MeasureSpec(name="fake", backend="fake", sdpa="device", impl=impl)
            r = measure(job(cut, seq=64, batch=1, dtype="bf16", precision=prec, measure=ms))
            assert r.status == "ok", r.error
            runs[prec, impl] = r.phase_breakdowns["forward"]["activations"]
    # the experts' copies (t*k rows) in fp32 under mixed precision: at least twice pure's bytes there
    for impl in ("reference", "hf"):
        assert runs["mixed", impl] > 1.5 * runs["pure", impl], impl
    assert runs["mixed", "reference"] == pytest.approx(runs["mixed", "hf"], rel=0.05)


@pytest.mark.parametrize("spec, why", [
    (dict(model_=replace(model("mixtral-8x7b"), layers=1, hidden=512)),
     "measure.impl=hf: mixtral-8x7b differs from its config.json in hidden"),
    (dict(model_="gpt2", wl=workload("lora", lora_rank=4, lora_targets=("q", "v"))),
     "measure.impl=hf: gpt2's k, q, v are one matrix (c_attn), adapted as one"),
    (dict(recompute="selective"), "measure.impl=hf: transformers has no selective recompute"),
])
def test_what_is_not_supported_yet_is_skipped_with_the_reason(spec, why):
    name = spec.pop("model_", "tiny")
    m = measure(job(name, seq=16, measure=hf("fake"), **spec))
    assert m.status == "skipped" and m.error.startswith(f"measure=fake: {why}")


def test_without_transformers_the_job_is_skipped_and_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    m = measure(job("tiny", seq=16, measure=hf("fake")))
    assert m.status == "skipped" and "install: pip install -e '.[hf]'" in m.error


def test_a_sweep_with_measure_impl_hf(tmp_path):
    from test_robustness import run

    proc = run("sweep.py", "-m", "model=tiny", "seq=32,64", "measure=fake", "measure.impl=hf",
               f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    t = pl.read_parquet(tmp_path / RESULTS_NAME)
    assert set(t["status"]) == {"ok"} and t["measured_peak_bytes"].null_count() == 0
    assert all('"impl": "hf"' in s for s in t["spec_json"])



ALIGNED_MODES = {
    "sdpa-pure": dict(precision="pure"),
    "sdpa-mixed": dict(precision="mixed"),
    "eager-pure": dict(precision="pure", attention="eager"),
    "eager-mixed": dict(precision="mixed", attention="eager"),
    "lora-pure": dict(precision="pure", wl=workload("lora", lora_rank=4, lora_targets=("q", "k", "v", "o"))),
    "lora-mixed": dict(precision="mixed", wl=workload("lora", lora_rank=4, lora_targets=("q", "v", "down"))),
}


@pytest.mark.parametrize("mode", ALIGNED_MODES)
def test_the_reference_model_keeps_what_transformers_keeps(mode):
    """Issue 12, part 2: the reference llama is written as transformers writes it (sdpa shares
    K/V heads with enable_gqa, eager adds a float mask and runs the softmax in fp32 and casts it
    back, peft casts the input to the adapters' dtype, the loss runs under autocast), so the
    backward of a GQA model holds the same bytes, but for the targets tensor the reference loop
    keeps (transformers shifts `labels` inside the loss). The forward peak differs by
    transformers' training KV cache (use_cache=True; docs/accuracy.md), so it is not compared."""
    runs = {}
    for impl in ("reference", "hf"):
        ms = MeasureSpec(name="fake", backend="fake", sdpa="device", impl=impl)
        m = measure(job(TINY, seq=32, batch=2, dtype="bf16", measure=ms, **ALIGNED_MODES[mode]))
        assert m.status == "ok", m.error
        runs[impl] = m
    ref, hf_ = runs["reference"], runs["hf"]
    targets = 2 * 32 * 8  # int64 (B, T)
    assert ref.phase_breakdowns["backward"]["activations"] - hf_.phase_breakdowns["backward"]["activations"] == targets


# --- any model_type, from its config.json (model=hf model.config=PATH) --------------------------

HF_CONFIGS = Path(__file__).parent / "data" / "hf_configs"
TINY_SIZES = dict(hidden_size=64, n_embd=64, intermediate_size=128, n_inner=128, ffn_hidden_size=128,
                  num_hidden_layers=2, n_layer=2, num_attention_heads=4, n_head=4, vocab_size=256,
                  moe_intermediate_size=32, shared_expert_intermediate_size=64, num_local_experts=4,
                  num_experts=4, n_routed_experts=4, num_experts_per_tok=2, experts_per_token=2,
                  q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                  first_k_dense_replace=1, n_group=1, topk_group=1, max_window_layers=1)


def tiny_config(cfg: dict) -> dict:
    """A real config.json cut down to 2 layers of width 64 (every other key as written)."""
    cfg = dict(cfg)
    if isinstance(cfg.get("text_config"), dict):
        return {**cfg, "text_config": tiny_config(cfg["text_config"])}
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    cfg.update({k: v for k, v in TINY_SIZES.items() if cfg.get(k) is not None})
    for key in ("num_key_value_heads", "num_kv_heads"):
        if cfg.get(key):
            cfg[key] = 4 if cfg[key] == heads else (1 if cfg[key] == 1 else 2)
    if cfg.get("head_dim") and cfg["model_type"] != "deepseek_v3":
        cfg["head_dim"] = 16
    if cfg.get("sliding_window"):
        cfg["sliding_window"] = 8
    if isinstance(cfg.get("layer_types"), list):
        kinds = cfg["layer_types"]
        cfg["layer_types"] = [kinds[0], kinds[-1]] if len(set(kinds)) > 1 else kinds[:2]
    if cfg.get("sliding_window_pattern"):
        cfg["sliding_window_pattern"] = 2
    for key in ("max_position_embeddings", "n_positions"):
        if cfg.get(key):
            cfg[key] = 512
    if cfg.get("mlp_only_layers"):
        cfg["mlp_only_layers"] = []
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(cfg.get(key), int) and cfg[key] >= 256:
            cfg[key] = None
    return cfg


def tiny_of(name: str, tmp_path: Path):
    import json

    from memsweep.hf_config import spec_from_file

    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_config(json.loads((HF_CONFIGS / f"{name}.json").read_text()))))
    return replace(spec_from_file(folder), source=str(folder / "config.json"))


# one real config per model_type (tests/data/hf_configs, SOURCES.md)
EVERY_TYPE = ["bert-base-uncased", "command-r-v01", "deepseek-v3", "falcon-7b", "gemma-2-2b", "gemma-2b",
              "gemma-3-1b", "gpt-oss-20b", "gpt2", "granite-3.0-2b", "llama3.2-1b", "mistral-7b-v0.1",
              "mixtral-8x7b", "olmoe-1b-7b", "phi-3-mini", "pythia-160m", "qwen1.5-moe-a2.7b", "qwen2.5-0.5b",
              "qwen3-30b-a3b", "qwen3-8b", "santacoder", "starcoder2-15b"]
TYPE_MODES = {
    "train": dict(precision="pure", attention="eager", recompute="full"),
    "inference": dict(wl=workload("inference", gen_tokens=2), attention="eager"),
}


@pytest.mark.parametrize("mode", TYPE_MODES)
@pytest.mark.parametrize("name", EVERY_TYPE)
def test_every_model_type_from_its_config_json_fake_equals_cpu(name, mode, tmp_path):
    """Issue 12, parts 1 and 3: the transformers model of a config.json as written (MoE, MLA,
    Gemma's sandwich norms and local layers, gpt-oss's sinks, Phi-3's fused matrices, ...) is
    measured under fake tensors, byte for byte what a real CPU run of it allocates."""
    m = tiny_of(name, tmp_path)
    kw = TYPE_MODES[mode]
    if m.family == "bert" and mode == "inference":
        kw = dict(kw, wl=workload("inference", gen_tokens=0))
    runs = {b: measure(job(m, seq=16, batch=2, dtype="bf16", measure=hf(b), **kw)) for b in ("fake", "cpu")}
    fake, cpu = runs["fake"], runs["cpu"]
    assert fake.status == "ok", fake.error
    assert (fake.peak_bytes, fake.breakdown) == (cpu.peak_bytes, cpu.breakdown)
    same_phases(fake, cpu)


@pytest.mark.parametrize("name, spec, why", [
    ("gemma-2-2b", dict(attention="sdpa"), "Gemma2ForCausalLM does not support an attention implementation"),
    ("mixtral-8x7b", dict(precision="pure", wl=workload("lora", lora_rank=4, lora_targets=("q", "v", "up"))),
     "mixtral's up is not an nn.Linear module peft adapts"),
    ("phi-3-mini", dict(wl=workload("lora", lora_rank=4, lora_targets=("q", "v"))),
     "phi3's k, q, v are one matrix (qkv_proj)"),
])
def test_what_transformers_cannot_run_here_is_a_skipped_row_saying_why(name, spec, why, tmp_path):
    m = measure(job(tiny_of(name, tmp_path), seq=16, batch=2, dtype="bf16", measure=hf("fake"), **spec))
    assert m.status == "skipped" and f"measure.impl=hf: {why}" in m.error, m.error


def test_the_training_kv_cache_is_what_use_cache_says_in_both_implementations():
    """workload.use_cache (transformers' default True): a training forward fills a KV cache whose
    fp32 K and V copies (mixed precision) are held until the loss is computed. Both the
    transformers model and the reference one hold exactly what detailed's term says; with
    use_cache=False transformers would look for packed sequences, which fake tensors cannot
    answer (handled: measure/hf.py, _one_sequence_per_row), so fake == cpu there too."""
    from memsweep.columns import Columns
    from memsweep.formulas.detailed import train_cache_bytes

    delta = {}
    for impl in ("reference", "hf"):
        peaks = {}
        for use_cache in (True, False):
            spec = job("tiny", seq=32, batch=2, dtype="bf16", precision="mixed",
                       wl=workload("train", use_cache=use_cache), measure=MeasureSpec(name="fake", backend="fake", sdpa="device", impl=impl))
            peaks[use_cache] = measure(spec).phase_peaks["forward"]
        delta[impl] = peaks[True] - peaks[False]
    expected = train_cache_bytes(Columns.from_specs([job("tiny", seq=32, batch=2, dtype="bf16", precision="mixed")]))[0]
    assert delta == {"reference": expected, "hf": expected} and expected > 0
    no_cache = {b: measure(job("tiny", seq=32, batch=2, dtype="bf16", precision="mixed", wl=workload("train", use_cache=False),
                               measure=hf(b))) for b in ("fake", "cpu")}
    assert no_cache["fake"].phase_peaks == no_cache["cpu"].phase_peaks


def test_inference_without_a_cache_is_refused_in_one_line():
    from memsweep.errors import ConfigError

    with pytest.raises(ConfigError, match="workload.use_cache=False: .*true for workload kind inference"):
        workload("inference", use_cache=False)


def test_a_sweep_measures_a_config_json_as_written(tmp_path):
    """`model=hf model.config=PATH measure.impl=hf`: the row's model is the file's (a Qwen3 MoE,
    bf16 weights), measured, and detailed's estimate stands beside it."""
    from test_robustness import run

    name = tiny_of("qwen3-30b-a3b", tmp_path).name
    cfg = tmp_path / name / "config.json"
    proc = run("sweep.py", "-m", "model=hf", f"model.config={cfg}", "seq=32", "precision=pure",
               "workload=train,inference", "workload.gen_tokens=0", "measure=fake", "measure.impl=hf",
               f"hydra.sweep.dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr
    t = pl.read_parquet(tmp_path / "out" / RESULTS_NAME).filter(pl.col("formula") == "detailed")
    assert set(t["status"]) == {"ok"} and t["measured_peak_bytes"].null_count() == 0
    assert all(str(cfg.resolve()) in s for s in t["spec_json"])


# --- a config.json no formula models (issue 12, part 3) -----------------------------------------

# Tiny configs of architectures the importer refuses (written here, not copied from a model):
# BLOOM's ALiBi attention, Mamba's state-space layers.
UNMODELLED = {
    "bloom": {"model_type": "bloom", "vocab_size": 256, "hidden_size": 64, "n_layer": 2, "n_head": 4},
    "mamba": {"model_type": "mamba", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
              "state_size": 8, "intermediate_size": 128},
}


def unmodelled(name: str, tmp_path: Path, measure_backend: str = "fake"):
    import json

    from memsweep.app.convert import model_of

    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(UNMODELLED[name]))
    return model_of({"name": "hf", "config": str(folder)}, {"backend": measure_backend, "impl": "hf"}), folder


@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("name", UNMODELLED)
def test_a_model_no_formula_models_is_measured_fake_equals_cpu(name, mode, tmp_path):
    m, _ = unmodelled(name, tmp_path)
    assert m.family == "hf" and m.unmodelled.startswith(f"{name}: model_type='{name}': not allowed")
    wl = workload("inference", gen_tokens=3) if mode == "inference" else workload("train")
    runs = {b: measure(job(m, seq=16, batch=2, dtype="bf16", attention="eager", wl=wl, measure=hf(b)))
            for b in ("fake", "cpu")}
    fake, cpu = runs["fake"], runs["cpu"]
    assert fake.status == "ok", fake.error
    assert (fake.peak_bytes, fake.breakdown) == (cpu.peak_bytes, cpu.breakdown)
    same_phases(fake, cpu)
    with torch.device("meta"):
        built = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**UNMODELLED[name]))
    assert fake.params == sum(p.numel() for p in built.parameters())
    assert fake.trainable_params == (fake.params if mode == "train" else 0)


def test_a_sweep_over_a_config_json_no_formula_models_says_so_and_measures_it(tmp_path):
    """Every formula's row says it does not model the file (status unsupported, no estimate); the
    measurement and the model's parameter counts are there; the summary shows the measurement."""
    from test_robustness import run

    _, folder = unmodelled("bloom", tmp_path)
    proc = run("sweep.py", "-m", "model=hf", f"model.config={folder}", "seq=32", "attention=eager",
               "workload=train,lora", "measure=fake", "measure.impl=hf",
               f"hydra.sweep.dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr
    t = pl.read_parquet(tmp_path / "out" / RESULTS_NAME)
    train, lora = (t.filter(pl.col("workload") == w) for w in ("train", "lora"))
    assert set(train["status"]) == {"unsupported"} and train["total_bytes"].null_count() == train.height
    assert all(e.startswith(f"formula {f}: no formula models this config.json (bloom: ")
               for f, e in zip(train["formula"], train["error"]))
    assert train["measured_peak_bytes"].min() > 0 and train["params"].min() > 0
    assert set(train["family"]) == {"hf"}
    # LoRA names of an unmapped model_type: skipped with the reason, never a guess
    assert set(lora["status"]) == {"skipped"} and "LoRA module names of model_type bloom" in lora["error"][0]
    assert "measured (fake)" in proc.stdout and "models no formula models (bloom)" in proc.stdout


def test_a_config_json_no_formula_models_without_transformers_measuring_it_is_refused_in_one_line(tmp_path):
    from memsweep.app.convert import model_of
    from memsweep.errors import ConfigError

    _, folder = unmodelled("bloom", tmp_path)
    for measure_cfg in ({"backend": "none", "impl": "hf"}, {"backend": "fake", "impl": "reference"}, None):
        with pytest.raises(ConfigError, match=r"^model_type='bloom': not allowed; allowed: .*llama.* \(or measure "
                                              r"the model with transformers alone: measure=fake measure.impl=hf\)$"):
            model_of({"name": "hf", "config": str(folder)}, measure_cfg)
    m, _ = unmodelled("bloom", tmp_path)  # a spec rebuilt from a row without transformers measuring it
    with pytest.raises(ConfigError, match="model.config=.*a model_type memsweep models"):
        job(m, seq=16, measure=MeasureSpec(name="fake", backend="fake", sdpa="device", impl="reference"))


# --- what transformers' forward holds, in the reference too (issue 12, part 2) ------------------

def test_eager_masks_and_held_embeddings_are_what_transformers_holds():
    """Eager attention: transformers builds one float (b, 1, s, s) causal mask per forward, held
    by every checkpoint under full recompute; a prefill holds the input embeddings to the end of
    the forward. The reference model does the same: full-recompute training peaks are equal (to
    an index vector), and
    an eager prefill by a few index vectors."""
    from memsweep.columns import Columns
    from memsweep.formulas.detailed import eager_mask_bytes, held_mask_bytes

    tiny8 = replace(TINY, layers=8)
    ref, ours = (MeasureSpec(name="fake", backend="fake", sdpa="device", impl=i) for i in ("hf", "reference"))
    train = dict(seq=256, batch=2, dtype="bf16", precision="pure", attention="eager", recompute="full")
    a, b = measure(job(tiny8, measure=ref, **train)), measure(job(tiny8, measure=ours, **train))
    # (within 0.1 %: at these sizes the two differ by one int64 index vector of the sequence)
    assert abs(a.phase_breakdowns["backward"]["activations"] - b.phase_breakdowns["backward"]["activations"]) <= 8 * 256
    c = Columns.from_specs([job(tiny8, **train)])
    assert held_mask_bytes(c)[0] == eager_mask_bytes(c)[0] == 2 * 256**2 * 2  # b s^2, bf16
    infer = dict(seq=256, batch=2, dtype="bf16", attention="eager", wl=workload("inference", gen_tokens=1))
    a, b = measure(job(TINY, measure=ref, **infer)), measure(job(TINY, measure=ours, **infer))
    # what was at stake: the mask (b s^2 bf16, 256 KiB) and the embeddings (t h bf16, 64 KiB); left:
    # the reference's preallocated decode slot and transformers' int64 position vectors (2 KiB each)
    mask, embeddings = 2 * 256**2 * 2, 2 * 256 * TINY.hidden * 2
    assert abs(b.phase_peaks["prefill"] - a.phase_peaks["prefill"]) <= 4096 < embeddings < mask


def test_full_recompute_peaks_in_the_first_blocks_backward_with_every_other_gradient():
    """Full recompute: the last block back-propagated (the first) holds one checkpoint but every
    other layer's weight gradient; with more gradient than checkpoint per layer that is the peak.
    detailed's moment has the measured gradients to the byte (its q, k, v and first norm, and the
    untied embedding, pending) and the total within 3 % (a tiny model: s^2 and t*h are close)."""
    from memsweep.columns import Columns
    from memsweep.formulas import FORMULAS

    spec = job(replace(TINY, layers=8), seq=512, batch=1, dtype="bf16", precision="pure", attention="eager",
               recompute="full", measure=MeasureSpec(name="fake", backend="fake", sdpa="device"))
    m = measure(spec)
    d = FORMULAS["detailed"](Columns.from_specs([spec]))
    assert m.breakdown["gradients"] == d.gradients[0] > 0
    assert m.phase_peaks["backward"] == m.peak_bytes
    assert abs(d.total[0] / m.peak_bytes - 1) <= 0.03


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v3"])
def test_lora_on_the_attention_of_moe_and_mla_models_is_measured_fake_equals_cpu(name, tmp_path):
    """peft adapts MoE models' attention (q/k/v/o_proj; MLA's q_a/q_b, kv_a, kv_b, o), with
    memsweep's adapter count; their experts are 3-D parameters, refused by name above."""
    from memsweep.columns import Columns, lora_params

    m = tiny_of(name, tmp_path)
    wl = workload("lora", lora_rank=4, lora_targets=("q", "k", "v", "o"))
    runs = {b: measure(job(m, seq=16, batch=2, dtype="bf16", precision="mixed", wl=wl, measure=hf(b)))
            for b in ("fake", "cpu")}
    assert runs["fake"].status == "ok", runs["fake"].error
    assert runs["fake"].trainable_params == int(lora_params(Columns.from_specs([job(m, wl=wl)]))[0])
    assert (runs["fake"].peak_bytes, runs["fake"].breakdown) == (runs["cpu"].peak_bytes, runs["cpu"].breakdown)
