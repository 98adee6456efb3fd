"""One job's analytic rows: a validated `JobSpec` and formulas in, one result row per formula out."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from memsweep.columns import Columns, active_params, base_params, model_values, trainable_params
from memsweep.errors import ConfigError
from memsweep.formulas import TERMS, Formula
from memsweep.specs import JobSpec, ModelSpec
from memsweep.units import GIB


def job_fields(spec: JobSpec, cols: Columns | None) -> dict[str, Any]:
    """The columns that describe the configuration (the same for every formula of a job); the
    parameter counts are left empty without columns (a model no formula models: its measurement
    counts them)."""
    m, w, o, p, hw = spec.model, spec.workload, spec.optimizer, spec.parallel, spec.hardware
    count = (lambda f: None) if cols is None else (lambda f: int(f(cols)[0]))
    return {
        "model": m.name, "family": m.family, "params": count(base_params),
        "active_params": count(active_params), "ep": p.ep,
        "trainable_params": count(trainable_params),
        "seq": spec.seq, "batch": spec.batch, "dtype": spec.dtype,
        "precision": spec.effective_precision, "workload": w.name, "optimizer": o.name,
        "optimizer_impl": o.impl, "recompute": spec.recompute, "attention": spec.attention,
        "tp": p.tp, "pp": p.pp, "dp": p.dp, "zero": p.zero, "sequence_parallel": p.sequence_parallel,
        "hardware": hw.name, "hardware_bytes": hw.usable_bytes,
        "gen_tokens": spec.gen_tokens, "lora_rank": w.lora_rank if w.kind == "lora" else 0,
        "spec_json": json.dumps(spec.to_dict(), sort_keys=True),
    }


def model_summary(m: ModelSpec) -> dict[str, int]:
    """Total and active parameter counts of one model (no job needed)."""
    cols = Columns.from_arrays(**model_values(m))
    return {"params": int(base_params(cols)[0]), "active_params": int(active_params(cols)[0])}


INT64_MAX = 2**63 - 1

# The keys that scale a job's byte counts, and a size each is rarely far above (for naming the
# key most out of scale when a count cannot be represented).
SCALE_KEYS = (("seq", lambda s: s.seq, 2**17), ("batch", lambda s: s.batch, 2**10),
              ("workload.gen_tokens", lambda s: s.workload.gen_tokens, 2**17),
              ("model.layers", lambda s: s.model.layers, 2**8), ("model.hidden", lambda s: s.model.hidden, 2**15),
              ("model.ffn", lambda s: s.model.ffn, 2**17), ("model.vocab", lambda s: s.model.vocab, 2**18),
              ("model.heads", lambda s: s.model.heads, 2**8), ("model.experts", lambda s: s.model.experts, 2**9),
              ("workload.lora_rank", lambda s: s.workload.lora_rank, 2**12))


def check_representable(spec: JobSpec, column: str, value: float) -> None:
    """A byte count a result row cannot hold (int64; NaN or inf from overflowing arithmetic) is a
    ConfigError naming the key most out of scale, instead of a part file that cannot be written."""
    if math.isfinite(value) and abs(value) <= INT64_MAX:
        return
    key, get, _ = max(SCALE_KEYS, key=lambda k: k[1](spec) / k[2])
    unit = " B" if column.endswith("_bytes") else ""
    raise ConfigError(key, get(spec), f"a value whose byte counts fit a result row ({column} would be "
                                      f"{value:.3g}{unit}; at most 2^63-1 = 8 EiB)")


def estimate_rows(spec: JobSpec, formulas: Sequence[Formula]) -> list[dict[str, Any]]:
    """Evaluate every formula on one job. A formula that raises becomes an error row of its own;
    a count no row can hold is a ConfigError for the whole job. A model no formula models gets a
    row per formula with status `unsupported` and the reason, and no estimate."""
    if spec.model.unmodelled:
        why = f"no formula models this config.json ({spec.model.unmodelled}); measured by transformers only"
        return [{**job_fields(spec, None), "formula": f.name, "status": "unsupported",
                 "error": f"formula {f.name}: {why}"} for f in formulas]
    cols = Columns.from_specs([spec])
    base = job_fields(spec, cols)
    for column in ("params", "active_params", "trainable_params", "hardware_bytes"):
        check_representable(spec, column, float(base[column]))
    rows = []
    for formula in formulas:
        row = {**base, "formula": formula.name}
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked right below
                b = formula(cols)
            terms = {f"{t}_bytes": float(getattr(b, t)[0]) for t in TERMS}
            values = {"total_bytes": sum(terms.values()), **terms}  # the total is named first
            for column, value in values.items():
                check_representable(spec, column, value)
            exact = {column: int(round(terms[column])) for column in terms}
            total = sum(exact.values())
            row.update(exact, total_bytes=total, total_gib=total / GIB,
                       fits=total <= spec.hardware.usable_bytes, status="ok")
        except ConfigError:
            raise
        except Exception as exc:  # one broken formula must not lose the others' rows
            row.update(status="error", error=f"formula {formula.name}: {type(exc).__name__}: {exc}")
        rows.append(row)
    return rows
