"""Dropout (issue 25, part 3): the config.json keys each family's transformers model reads, peft's
`lora_dropout`, CUDA's dropout kernel in the fake trace, and `detailed` against it, phase by phase."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import job, model, workload

from memsweep.columns import Columns
from memsweep.errors import ConfigError
from memsweep.hf_config import import_config
from memsweep.specs import ModelSpec

CORPUS = Path(__file__).parent / "data" / "hf_configs"


def _cfg(name: str, **changes) -> dict:
    return {**json.loads((CORPUS / f"{name}.json").read_text()), **changes}


@pytest.mark.parametrize("name,changes,expected", [
    # (attention, hidden, embedding): the keys transformers' modeling code reads for each family
    ("gpt2", {}, (0.1, 0.1, 0.1)),  # attn_pdrop, resid_pdrop, embd_pdrop
    ("gpt2", dict(attn_pdrop=0.0, resid_pdrop=0.2, embd_pdrop=0.3), (0.0, 0.2, 0.3)),
    ("bert-base-uncased", {}, (0.1, 0.1, 0.1)),  # hidden_dropout_prob: blocks and embeddings
    ("starcoder2-15b", dict(residual_dropout=0.05), (0.1, 0.05, 0.1)),
    ("gpt-neox-20b", dict(hidden_dropout=0.1), (0.0, 0.1, 0.1)),  # GPTNeoXModel.emb_dropout too
    ("phi-3-mini", dict(resid_pdrop=0.1, embd_pdrop=0.1), (0.0, 0.1, 0.0)),  # Phi3Model reads no embd_pdrop
    ("llama3.2-1b", dict(attention_dropout=0.1, hidden_dropout=0.1), (0.1, 0.0, 0.0)),  # attention's only
    ("falcon-7b", dict(attention_dropout=0.1, hidden_dropout=0.2), (0.1, 0.2, 0.0)),
])
def test_the_importer_reads_the_dropout_keys_each_family_uses(name, changes, expected):
    spec, _ = import_config(_cfg(name, **changes), "x")
    assert (spec.attention_dropout, spec.hidden_dropout, spec.embedding_dropout) == expected


def test_presets_carry_their_config_json_dropout():
    assert (model("gpt2").attention_dropout, model("gpt2").hidden_dropout, model("gpt2").embedding_dropout) == (0.1,) * 3
    assert model("bert-large-uncased").hidden_dropout == 0.1 and model("starcoder2-15b").embedding_dropout == 0.1
    assert not model("llama3-8b").dropout


@pytest.mark.parametrize("build,key", [
    (lambda: import_config(_cfg("gpt2", attn_pdrop=1.5), "x"), "attn_pdrop=1.5"),
    (lambda: import_config(_cfg("starcoder2-15b", residual_dropout="0.1"), "x"), "residual_dropout='0.1'"),
    (lambda: dataclasses.replace(model("tiny"), hidden_dropout=1.0), "model.hidden_dropout=1.0"),
    (lambda: dataclasses.replace(model("tiny"), attention_dropout=-0.1), "model.attention_dropout=-0.1"),
    (lambda: workload("train", lora_dropout=0.05), "workload.lora_dropout=0.05"),
    (lambda: workload("lora", lora_dropout=1.0), "workload.lora_dropout=1.0"),
])
def test_bad_dropout_values_are_one_line_errors_naming_the_key(build, key):
    with pytest.raises(ConfigError) as err:
        build()
    text = str(err.value)
    assert key in text and "\n" not in text and ("[0, 1)" in text or "lora workload" in text)


torch = pytest.importorskip("torch")

from memsweep.formulas import FORMULAS  # noqa: E402
from memsweep.formulas.detailed import phase_peaks, saved_activations_bytes  # noqa: E402
from memsweep.measure.backends import measure  # noqa: E402


def small(family: str, **changes) -> ModelSpec:
    """test_detailed_accuracy's small models, narrower (3 heads of 32, one K/V head for llama)."""
    from test_detailed_accuracy import small as accuracy_small

    dims = dict(hidden=96, heads=3, kv_heads=1 if family == "llama" else 3, ffn=256, vocab=500, max_positions=512)
    return accuracy_small(family, **{**dims, **changes})


DROP = dict(attention_dropout=0.1, hidden_dropout=0.1, embedding_dropout=0.1)


def _saved_after_forward(spec) -> tuple[int, object]:
    import memsweep.measure.backends as be

    got = {}
    orig = be._from_tracker

    def grab(backend, tracker, *a, **k):
        got["marks"] = tracker.marks
        return orig(backend, tracker, *a, **k)

    be._from_tracker = grab
    try:
        m = measure(spec)
    finally:
        be._from_tracker = orig
    assert m.status == "ok", m.error
    return got["marks"]["after_forward"]["activations"], m


def test_fake_keeps_cudas_bool_mask_where_the_cpu_keeps_a_noise_tensor():
    """Dropout.cpp: CUDA's fused native_dropout keeps a 1-byte mask per element; the CPU's _dropout a
    noise tensor in the input's dtype. Hidden dropout in a 3-layer model: 2 masks a layer."""
    t, h, layers = 2 * 128, 96, 3
    base = dict(seq=128, batch=2, dtype="bf16", precision="pure", measure="fake")
    added = {}
    for sdpa in ("gpu", "device"):
        saved = []
        for m in (small("llama"), small("llama", hidden_dropout=0.1)):
            spec = job(m, **base)
            saved.append(_saved_after_forward(dataclasses.replace(spec, measure=dataclasses.replace(spec.measure, sdpa=sdpa)))[0])
        added[sdpa] = saved[1] - saved[0]
    assert added == {"gpu": 2 * layers * t * h * 1, "device": 2 * layers * t * h * 2}


CASES = {
    # model dropout: eager keeps the attention's mask (+ the dropped copy when no cast precedes it)
    "gpt2-eager-mixed": (small("gpt2", **DROP), dict(attention="eager")),
    "gpt2-eager-pure-full": (small("gpt2", **DROP), dict(attention="eager", precision="pure", recompute="full")),
    "bert-eager-pure": (small("bert", **DROP), dict(attention="eager", precision="pure")),
    "bert-sdpa-mixed-lora": (small("bert", **DROP), dict(wl="lora")),
    "llama-sdpa-mixed": (small("llama", **DROP), dict()),
    "llama-eager-fp32": (small("llama", **DROP), dict(attention="eager", dtype="fp32")),
    # peft's lora_dropout: the mask under autocast; the dropped copies in place of the shared input
    "lora-qkvo-pure": (small("llama"), dict(precision="pure", wl=workload("lora", lora_targets=("q", "k", "v", "o"),
                                                                          lora_dropout=0.05))),
    "lora-o-pure": (small("llama"), dict(precision="pure", wl=workload("lora", lora_targets=("o",), lora_dropout=0.05))),
    "lora-all-mixed": (small("llama"), dict(wl=workload("lora", lora_targets=("q", "k", "v", "o", "gate", "up", "down"),
                                                        lora_dropout=0.1))),
    "lora-down-fp32-eager": (small("llama"), dict(dtype="fp32", attention="eager",
                                                  wl=workload("lora", lora_targets=("down",), lora_dropout=0.1))),
    "gpt2-lora-mlp-pure": (small("gpt2"), dict(precision="pure", wl=workload("lora", lora_targets=("up", "down"),
                                                                             lora_dropout=0.1))),
}


def _without_dropout(m: ModelSpec, top: dict) -> tuple[ModelSpec, dict]:
    top = dict(top)
    if not isinstance(top.get("wl", "train"), str):
        top["wl"] = dataclasses.replace(top["wl"], lora_dropout=0.0)
    return dataclasses.replace(m, attention_dropout=0.0, hidden_dropout=0.0, embedding_dropout=0.0), top


@pytest.mark.parametrize("case", CASES)
def test_detailed_adds_what_dropout_keeps(case):
    """What dropout adds, traced (the same step with and without it) and by `detailed`: to the saved
    activations exactly, and to each phase's peak within 0.2 % of that peak. (The steps without
    dropout are not all on `detailed`'s grid, e.g. o-only LoRA: their own gaps are not dropout's.)"""
    runs = []
    for m, top in (CASES[case], _without_dropout(*CASES[case])):
        spec = job(m, seq=128, batch=2, measure="fake", **{"dtype": "bf16", **top})
        saved, meas = _saved_after_forward(spec)
        cols = Columns.from_specs([spec])
        runs.append((saved, float(saved_activations_bytes(cols)[0]), meas.phase_peaks,
                     {k: float(v[0]) for k, v in phase_peaks(cols).items()}))
    (saved, est, peaks, phases), (saved0, est0, peaks0, phases0) = runs
    assert saved > saved0
    assert est - est0 == pytest.approx(saved - saved0, rel=1e-3, abs=64)  # (an SDPA kernel's RNG seed)
    for phase, peak in peaks.items():
        added, modelled = peak - peaks0[phase], phases[phase] - phases0[phase]
        assert abs(modelled - added) <= 0.002 * peak, (phase, added, modelled)


def test_attention_dropout_steers_sdpas_kernel_as_on_the_gpu():
    """cuDNN takes dropout only in multiples of 1/16 (sdp_utils.cpp): an H100 bf16 training step
    with p=0.1 runs flash, with p=0.125 cuDNN; detailed's attn_kernel names the fake run's kernel."""
    from memsweep.formulas.detailed import attn_kernel_names

    for p, kernel in ((0.1, "flash"), (0.125, "cudnn"), (0.0, "cudnn")):
        spec = job(small("gpt2", attention_dropout=p), seq=64, batch=1, dtype="bf16", measure="fake",
                   hardware="h100-80g")
        meas = measure(spec)
        assert meas.status == "ok", meas.error
        assert meas.attn_kernel == kernel == attn_kernel_names(Columns.from_specs([spec]))[0]
