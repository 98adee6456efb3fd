"""One job's analytic rows: a validated `JobSpec` and formulas in, one result row per formula out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from memsweep.columns import Columns, active_params, base_params, model_values, trainable_params
from memsweep.formulas import TERMS, Formula
from memsweep.specs import JobSpec, ModelSpec
from memsweep.units import GIB


def job_fields(spec: JobSpec, cols: Columns) -> dict[str, Any]:
    """The columns that describe the configuration (the same for every formula of a job)."""
    m, w, o, p, hw = spec.model, spec.workload, spec.optimizer, spec.parallel, spec.hardware
    return {
        "model": m.name, "family": m.family, "params": int(base_params(cols)[0]),
        "active_params": int(active_params(cols)[0]), "ep": p.ep,
        "trainable_params": int(trainable_params(cols)[0]),
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


def estimate_rows(spec: JobSpec, formulas: Sequence[Formula]) -> list[dict[str, Any]]:
    """Evaluate every formula on one job. A formula that raises becomes an error row of its own."""
    cols = Columns.from_specs([spec])
    base = job_fields(spec, cols)
    rows = []
    for formula in formulas:
        row = {**base, "formula": formula.name}
        try:
            b = formula(cols)
            terms = {f"{t}_bytes": int(round(float(getattr(b, t)[0]))) for t in TERMS}
            total = sum(terms.values())
            row.update(terms, total_bytes=total, total_gib=total / GIB,
                       fits=total <= spec.hardware.usable_bytes, status="ok")
        except Exception as exc:  # one broken formula must not lose the others' rows
            row.update(status="error", error=f"formula {formula.name}: {type(exc).__name__}: {exc}")
        rows.append(row)
    return rows
