"""Random configurations from the whole key space, `detailed` against `measure=fake` moment by
moment (issue 25, part 6): `python scripts/accuracy.py --random N --seed S`.

A grid is what its author thought of; a draw is what a user may reach. `draw` picks, per
configuration, a model preset (every family and architecture), a workload (train, LoRA on a
random target set and rank, QLoRA either recipe, inference), the dtype and precision (mixed,
pure, fp32), recompute, attention, the optimizer (every preset, sometimes stepped in the
backward), the loss (chunked, fused), offload, gradient accumulation, batch 1-8 and a sequence
length that is not a power of two; models are cut to a few layers (every layer is alike, and the
trace stays seconds long). A combination the specs refuse is drawn again (a refusal is one
ConfigError line, which `tests/test_fuzz_inputs.py` checks elsewhere).

`compare` measures each with the fake backend and returns one row per configuration and phase
(forward, backward, optimizer; prefill, decode), with detailed's peak of that phase
(`detailed.phase_peaks`) and the error; `worst_by_feature` gives, for each drawn key and value,
the worst |error| of the total and of any phase. Measurement needs torch (the `measure` extra).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import polars as pl

from memsweep.errors import ConfigError
from memsweep.presets import job_spec, load_preset, model_spec, workload_spec
from memsweep.specs import JobSpec, LossSpec, OffloadSpec, OptimizerSpec

MODELS = ("tiny", "gpt2", "bert-base-uncased", "llama3.2-1b", "llama3-8b", "mistral-7b", "qwen2.5-0.5b", "qwen3-8b",
          "phi-3-mini", "gemma-2-2b", "gemma-3-12b", "mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b", "deepseek-v3",
          "falcon-7b", "gpt-neox-20b", "starcoder2-15b", "mistral-nemo-12b")
OPTIMIZERS = ("adamw", "adam", "sgd", "sgd_momentum", "adamw8bit", "paged_adamw8bit", "lion", "adafactor")
LORA_TARGETS = (("q", "v"), ("q", "k", "v", "o"), ("gate", "up", "down"), ("q", "k", "v", "o", "gate", "up", "down"))
FEATURES = ("model", "family", "workload", "targets", "dtype", "precision", "recompute", "attention", "optimizer",
            "in_backward", "loss", "offload", "grad_accum", "batch", "seq_bucket", "dropout")
"""The drawn keys `worst_by_feature` reports on (each row carries them)."""


def _one(rng: random.Random, small: bool) -> tuple[JobSpec, dict[str, Any]]:
    name = rng.choice(MODELS)
    m = model_spec(name)
    layers = rng.choice((1, 2)) if small else rng.choice((2, 3, 4))
    changes: dict[str, Any] = {"layers": max(layers, len(m.layer_pattern) if m.local_layers else 1)}
    if m.dense_layers:
        changes["dense_layers"] = min(m.dense_layers, changes["layers"] - 1)
    m = dataclasses.replace(m, **changes)
    kind = rng.choice(("train", "train", "lora", "lora", "qlora", "inference"))
    if kind in ("lora", "qlora"):
        targets = tuple(t for t in rng.choice(LORA_TARGETS) if t != "gate" or m.mlp != "gelu")
        wl = workload_spec("qlora" if kind == "qlora" and rng.random() < 0.5 else
                           ("qlora-torchtune" if kind == "qlora" else "lora"),
                           lora_rank=rng.choice((4, 8, 16, 64)), lora_targets=list(targets),
                           lora_dropout=rng.choice((0.0, 0.0, 0.05, 0.1)))  # peft's default, the recipes'
    elif kind == "inference":
        wl = workload_spec("inference", gen_tokens=rng.choice((0, 1, 16, 100)))
    else:
        wl = workload_spec("train")
    dtype = rng.choice(("bf16", "bf16", "fp16", "fp32"))
    precision = "pure" if kind == "inference" or dtype == "fp32" else rng.choice(("mixed", "mixed", "pure"))
    training = kind != "inference"
    recompute = rng.choice(("none", "none", "full", "selective")) if training else "none"
    attention = rng.choice(("sdpa", "sdpa", "eager"))
    optimizer = rng.choice(OPTIMIZERS) if training else "adamw"
    opt = OptimizerSpec(**load_preset("optimizer", optimizer))
    in_backward = training and rng.random() < 0.15
    if in_backward:
        opt = dataclasses.replace(opt, in_backward=True)
    loss = LossSpec()
    if training and rng.random() < 0.3:
        loss = LossSpec(chunks=rng.choice((2, 4, 8))) if rng.random() < 0.6 else LossSpec(fused=True)
    offload = OffloadSpec()
    if training and kind == "train" and rng.random() < 0.1:
        offload = OffloadSpec(optimizer=True)
    seq_max = 512 if small else 16384
    seq = rng.randrange(64, seq_max + 1)
    if seq & (seq - 1) == 0:
        seq += 1  # never a power of two
    seq = min(seq, m.max_positions - (wl.gen_tokens if m.decoder and kind == "inference" else 0))
    batch = rng.randint(1, 2 if small else 8)
    spec = job_spec(m, wl=wl, optimizer=opt, measure="fake", seq=seq, batch=batch, dtype=dtype, precision=precision,
                    recompute=recompute, attention=attention, loss=loss, offload=offload,
                    grad_accum=rng.choice((1, 1, 2)) if training else 1)
    return spec, features(spec)


def features(spec: JobSpec) -> dict[str, Any]:
    """The keys a row of `compare` reports its configuration by (FEATURES, seq and layers)."""
    m, wl, training = spec.model, spec.workload, spec.workload.training
    seq = spec.seq
    return dict(model=m.name, family=m.family, workload=wl.name,
                targets="+".join(wl.lora_targets) if wl.kind == "lora" else "-", dtype=spec.dtype,
                precision=spec.effective_precision, recompute=spec.recompute, attention=spec.attention,
                optimizer=spec.optimizer.name if training else "-", in_backward=spec.optimizer.in_backward,
                loss=("fused" if spec.loss.fused else f"chunks{spec.loss.chunks}") if training else "-",
                offload="optimizer" if spec.offload.optimizer else "none", grad_accum=spec.grad_accum,
                batch=spec.batch, seq=seq, layers=m.layers,
                seq_bucket="<=512" if seq <= 512 else "<=2048" if seq <= 2048 else "<=8192" if seq <= 8192 else ">8192",
                dropout="+".join(k for k, on in (("model", m.dropout), ("lora", wl.kind == "lora" and wl.lora_dropout > 0))
                                 if on and training) or "-")


def draw(n: int, seed: int, small: bool = False) -> list[tuple[JobSpec, dict[str, Any]]]:
    """`n` valid configurations, the same for the same (n, seed, small)."""
    rng = random.Random(seed)
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n:
            raise RuntimeError(f"only {len(out)} valid configurations in {tries} draws")
        try:
            out.append(_one(rng, small))
        except ConfigError:
            continue
    return out


def compare(drawn: Sequence[tuple[JobSpec, dict[str, Any]]]) -> pl.DataFrame:
    """One row per configuration x measured phase: estimated and measured peak, the error, the
    total's error, the status of the measurement and the drawn features."""
    from memsweep.columns import Columns
    from memsweep.formulas.detailed import DetailedConstants, peak_breakdown, phase_peaks
    from memsweep.measure.backends import measure

    rows = []
    for i, (spec, features) in enumerate(drawn):
        m = measure(spec)
        base = {"config": i, **features, "status": m.status, "error": m.error}
        if m.status != "ok":
            rows.append({**base, "phase": None})
            continue
        cols = Columns.from_specs([spec])
        total = float(peak_breakdown(cols, DetailedConstants()).total[0])
        phases = phase_peaks(cols)
        for phase, measured in m.phase_peaks.items():
            if phase not in phases or not measured:
                continue
            est = float(phases[phase][0])
            if est != est:  # NaN: a phase the estimate has not (a decode section of 0 tokens)
                continue
            rows.append({**base, "phase": phase, "estimated_bytes": est, "measured_bytes": float(measured),
                         "error_pct": 100.0 * (est / measured - 1.0),
                         "total_error_pct": 100.0 * (total / m.peak_bytes - 1.0)})
    return pl.DataFrame(rows, infer_schema_length=None)


def worst_by_feature(errors: pl.DataFrame) -> pl.DataFrame:
    """For each drawn key and value: configurations, worst |error| of the total and of any phase,
    and where the worst phase is."""
    ok = errors.filter(pl.col("phase").is_not_null())
    parts = []
    for feature in FEATURES:
        t = (ok.with_columns(pl.col(feature).cast(pl.String).alias("value"), pl.col("error_pct").abs().alias("abs"),
                             pl.col("total_error_pct").abs().alias("abs_total"))
             .group_by("value")
             .agg(pl.col("config").n_unique().alias("configs"), pl.col("abs_total").max().alias("worst_total_pct"),
                  pl.col("abs").max().alias("worst_phase_pct"),
                  pl.col("phase").sort_by("abs").last().alias("worst_phase"),
                  pl.col("config").sort_by("abs").last().alias("worst_config"))
             .with_columns(pl.lit(feature).alias("feature")))
        parts.append(t.select("feature", "value", "configs", "worst_total_pct", "worst_phase_pct", "worst_phase",
                              "worst_config").sort("worst_phase_pct", descending=True))
    return pl.concat(parts)


# --- every shipped family through transformers (issue 25's first "done when") ------------------

FAMILY_MODELS = ("llama3-8b", "mistral-7b", "qwen2.5-7b", "gpt2", "qwen3-8b", "mistral-nemo-12b", "phi-3-mini",
                 "gemma-2-2b", "gemma-3-12b", "starcoder2-15b", "falcon-7b", "gpt-neox-20b", "mixtral-8x7b",
                 "qwen3-30b-a3b", "gpt-oss-20b", "deepseek-v3")
"""One preset per family and architecture transformers builds (measure.impl=hf)."""
FAMILY_MODES = {
    "train-mixed": dict(precision="mixed"),
    "train-pure": dict(precision="pure"),
    "lora-mixed": dict(precision="mixed", lora=True),
    "inference": dict(precision="pure", inference=True),
}
NO_SDPA = ("gemma-2-2b", "gpt-oss-20b")
"""transformers has no sdpa path for these (Gemma2 / GptOss attention classes): eager runs."""


def family_grid(seqs: Sequence[int] = (2048, 8192), layers: int = 4) -> list[tuple[JobSpec, dict[str, Any]]]:
    """Each of FAMILY_MODELS (cut to `layers` layers, or its local/global pattern's length; every
    layer is alike) x FAMILY_MODES x `seqs`, batch 1, bf16, measured by transformers' model under
    fake tensors (measure.impl=hf)."""
    from memsweep.specs import MeasureSpec

    hf = MeasureSpec(name="fake", backend="fake", impl="hf")
    out = []
    for name in FAMILY_MODELS:
        m = model_spec(name)
        n = max(layers, len(m.layer_pattern) if m.local_layers else 1)
        m = dataclasses.replace(m, layers=n, dense_layers=min(m.dense_layers, n - 1))
        attention = "eager" if name in NO_SDPA else "sdpa"
        for mode, kw in FAMILY_MODES.items():
            for s in sorted({min(seq, m.max_positions - (16 if kw.get("inference") else 0)) for seq in seqs}):
                if kw.get("lora"):
                    wl = workload_spec("lora", lora_rank=16, lora_targets=["q", "k", "v", "o"])
                elif kw.get("inference"):
                    wl = workload_spec("inference", gen_tokens=16)
                else:
                    wl = workload_spec("train")
                spec = job_spec(m, wl=wl, measure=hf, seq=s, batch=1, dtype="bf16", precision=kw["precision"],
                                attention=attention)
                out.append((spec, {**features(spec), "mode": mode}))
    return out
