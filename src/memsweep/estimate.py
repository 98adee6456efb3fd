"""Analytic rows: a validated `JobSpec` and formulas in, one result row per formula out.

`estimate_rows` does one job; `estimate_many` does many at once, the way a batched sweep does
(`hydra/launcher=batched`): every formula, count and time estimate runs once on all the jobs'
columns. It is the same code: `estimate_rows` is `estimate_many` of one job, so the rows are
identical whichever way a job is estimated."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from memsweep import capacity
from memsweep.columns import Columns, active_params, base_params, model_values, trainable_params
from memsweep.errors import ConfigError
from memsweep.formulas import TERMS, Formula
from memsweep.formulas.detailed import (
    attn_kernel_names, cpu_bytes, moment_report, peak_breakdown, serve_kv_sequence_bytes, serve_kv_token_bytes,
)
from memsweep.specs import JobSpec, ModelSpec
from memsweep.units import GIB, MIB


def job_fields(spec: JobSpec, count: Callable[[Callable], int] | None) -> dict[str, Any]:
    """The columns that describe the configuration (the same for every formula of a job).
    `count(f)` is the job's parameter count `f` (columns.base_params, ...); without it the counts
    are left empty (a model no formula models: its measurement counts them)."""
    m, w, o, p, hw = spec.model, spec.workload, spec.optimizer, spec.parallel, spec.hardware
    count = count or (lambda f: None)
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
        "quant": spec.quant, "kbit_prepare": spec.kbit, "loss_chunks": spec.loss.chunks, "fused_loss": spec.loss_kernel == "fused_linear",
        "kernels": spec.effective_kernels.label,
        "in_backward": o.in_backward, "kv_dtype": spec.kv_dtype, "grad_accum": spec.grad_accum,
        "mixed_policy": spec.mixed_policy if spec.mixed else None,
        "offload": "+".join(k for k in ("optimizer", "params", "activations") if getattr(spec.offload, k)) or "none",
        "capacity_bytes": capacity_bytes(spec), "margin": spec.margin,
    }


def techniques_of(spec: JobSpec) -> list[str]:
    """The techniques of issue 13 a job uses, by name (the seed formulas model none of them: their
    rows say so instead of answering for a plain AdamW step)."""
    o, w, loss = spec.optimizer, spec.workload, spec.loss
    used = [f"optimizer={o.name}"] if o.name not in ("adamw", "adam", "sgd", "sgd_momentum") else []
    used += ["optimizer.in_backward"] if o.in_backward and w.training else []
    used += [f"loss.chunks={loss.chunks}"] if loss.chunks != 1 else []
    used += ["loss.fused"] if loss.fused else []
    used += list(spec.kernels.used)
    used += [f"workload.quant={w.quant}"] if w.quant != "none" else []
    used += ["workload.kbit_prepare"] if spec.kbit else []
    used += [f"kv_dtype={spec.kv_dtype}"] if spec.kv_dtype != "auto" else []
    used += ["workload.prefill_logits=all"] if w.prefill_logits == "all" else []
    used += ["workload=serve"] if w.kind == "serve" else []
    used += [f"offload.{k}" for k in ("optimizer", "params", "activations") if getattr(spec.offload, k)]
    used += [f"grad_accum={spec.grad_accum}"] if spec.grad_accum != 1 else []
    used += ["mixed_policy=param_dtype"] if spec.mixed and spec.mixed_policy != "autocast" else []
    return used


def capacity_bytes(spec: JobSpec) -> int:
    """What a job may fill (`fits` compares its total with this): `capacity.capacity_bytes`, the
    planner's definition, (memory - reserve) x (1 - margin); a serving engine at most its own
    budget, `gpu_util` of the memory less the reserve. Whole bytes, rounded down."""
    hw, w = spec.hardware, spec.workload
    serve = w.kind == "serve"
    return math.floor(capacity.capacity_bytes(hw.memory_bytes, hw.reserved_mib * MIB, spec.margin,
                                              gpu_util=w.gpu_util if serve else None, serve=serve))


def engine_bytes(spec: JobSpec) -> int:
    """A serving engine's own budget, `gpu_util` of the memory less the reserve (vLLM's
    `requested_memory`, its non-torch memory inside it): what vLLM fills with its KV cache,
    whatever margin a plan keeps."""
    hw = spec.hardware
    return int(capacity.engine_budget_bytes(spec.workload.gpu_util, hw.memory_bytes, hw.reserved_mib * MIB))


def serve_fields(spec: JobSpec, value: Callable[[str], float]) -> dict[str, Any]:
    """Inference and serving: KV bytes per token; serving: the tokens the paged cache holds in what
    weights, activations and graphs leave of the engine's budget (vLLM's own arithmetic, which no
    margin enters), in whole blocks, and how many sequences of `seq` tokens that is (vLLM's
    "Maximum concurrency"). `value(name)`: the job's `cpu_bytes`, `kv_token_bytes`,
    `kv_sequence_bytes` or `non_kv_bytes` (its breakdown's total less the KV cache)."""
    if spec.workload.training:
        return {"cpu_bytes": int(round(value("cpu_bytes")))}
    if not spec.model.decoder:
        return {}
    out = {"kv_bytes_per_token": int(round(value("kv_token_bytes")))}
    if spec.workload.kind != "serve":
        return out
    free = engine_bytes(spec) - value("non_kv_bytes")
    block = spec.workload.block_size
    per_token = value("kv_token_bytes")
    blocks = max(0, int(free // (per_token * block)))
    per_seq = value("kv_sequence_bytes")
    return {**out, "kv_tokens": blocks * block, "max_concurrent_seqs": max(0, int(free // per_seq))}


def time_fields(spec: JobSpec, step: Callable[[], tuple[Any, int]]) -> dict[str, Any]:
    """The time model's columns (formulas/timing.py): `step()` gives the job's `StepTime` and its
    row in it. Null where the hardware preset gives no speeds; a failing estimate leaves them null
    and never costs the memory rows."""
    try:
        t, i = step()
    except Exception:  # noqa: BLE001 (the time estimate is an extra; the memory rows must land)
        return {}
    tokens = spec.gen_tokens if not spec.workload.training else 0

    def value(x, scale: float = 1.0) -> float | None:
        v = float(x[i]) * scale
        return v if math.isfinite(v) else None

    training = spec.workload.training
    return {
        "flops": value(t.flops), "bytes_moved": value(t.bytes_moved),
        "est_step_time_s": value(t.step_s), "est_tokens_per_s": value(t.tokens_per_s), "est_mfu": value(t.mfu),
        "est_forward_s": value(t.forward_s) if training else None,
        "est_backward_s": value(t.backward_s) if training else None,
        "est_optimizer_s": value(t.optimizer_s) if training else None,
        "est_prefill_s": None if training else value(t.prefill_s),
        "est_decode_token_s": value(t.decode_s, 1.0 / tokens) if tokens else None,
        "est_comm_s": value(t.comm_s),
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


class _Jobs:
    """The columns of many jobs, and whatever their rows read from them, each computed once for
    all the jobs on first use. The arithmetic is element-wise (numpy), so a job's element is what
    the job alone gives; a computation that raises for the batch is redone for the asking job
    alone, so the exception is that job's own, raised where a job estimated alone raises it."""

    def __init__(self, specs: Sequence[JobSpec], time) -> None:
        self.specs, self.time = list(specs), time
        self.cols = Columns.from_specs(self.specs)
        self._all: dict[Any, Any] = {}

    def at(self, key: Any, compute: Callable[[Columns, int | None], Any], j: int) -> tuple[Any, int]:
        """(result, job j's index in it) of `compute(columns, job)`: of every job (job None),
        computed once; of job j alone where that raised."""
        if key not in self._all:
            try:
                self._all[key] = compute(self.cols, None)
            except Exception as exc:  # noqa: BLE001 (whose exception it is: asked job by job below)
                self._all[key] = exc
        got = self._all[key]
        if isinstance(got, Exception):
            if len(self.specs) == 1:
                raise got
            return compute(self.cols.take(np.array([j])), j), 0
        return got, j

    def value(self, key: Any, compute: Callable[[Columns], Any], j: int) -> float:
        got, i = self.at(key, lambda c, job: compute(c), j)
        return float(got[i])

    def step_time(self, c: Columns, job: int | None):
        from memsweep.formulas.timing import Speeds, TimeConstants, step_time

        specs = self.specs if job is None else [self.specs[job]]
        speeds = Speeds.of([s.hardware for s in specs], [s.dtype for s in specs])
        with np.errstate(all="ignore"):
            return step_time(c, speeds, self.time or TimeConstants())

    def breakdown(self, n: int, formula: Formula, c: Columns, job: int | None):
        """Formula n's breakdown (the cached one of every job, when there is one)."""
        got = self._all.get(("formula", n)) if job is None else None
        if got is None or isinstance(got, Exception):
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked on each row
                got = formula(c)
        return got


SERVE_COLUMNS: dict[str, Callable[[Columns], Any]] = {
    "cpu_bytes": cpu_bytes, "kv_token_bytes": serve_kv_token_bytes, "kv_sequence_bytes": serve_kv_sequence_bytes}


def _unmodelled_rows(spec: JobSpec, formulas: Sequence[Formula]) -> list[dict[str, Any]]:
    why = f"no formula models this config.json ({spec.model.unmodelled}); measured by transformers only"
    return [{**job_fields(spec, None), "formula": f.name, "status": "unsupported",
             "error": f"formula {f.name}: {why}"} for f in formulas]


def _job_rows(jobs: _Jobs, j: int, formulas: Sequence[Formula]) -> list[dict[str, Any]]:
    """Job j's rows: a formula that raises is an error row of its own; a count no row can hold is
    a ConfigError for the whole job."""
    spec = jobs.specs[j]
    base = {**job_fields(spec, lambda f: int(jobs.value(f, f, j))),
            **time_fields(spec, lambda: jobs.at("time", jobs.step_time, j))}
    for column in ("params", "active_params", "trainable_params", "hardware_bytes"):
        check_representable(spec, column, float(base[column]))
    rows = []
    used = techniques_of(spec)
    for n, formula in enumerate(formulas):
        row = {**base, "formula": formula.name}
        if used and formula.evaluate is not peak_breakdown:
            rows.append({**row, "status": "unsupported",
                         "error": f"formula {formula.name}: models none of {', '.join(used)} (detailed does)"})
            continue
        try:
            b, i = jobs.at(("formula", n), lambda c, job, n=n, f=formula: jobs.breakdown(n, f, c, job), j)
            terms = {f"{t}_bytes": float(getattr(b, t)[i]) for t in TERMS}
            values = {"total_bytes": sum(terms.values()), **terms}  # the total is named first
            for column, value in values.items():
                check_representable(spec, column, value)
            exact = {column: int(round(terms[column])) for column in terms}
            total = sum(exact.values())
            row.update(exact, total_bytes=total, total_gib=total / GIB, fits=total <= base["capacity_bytes"],
                       headroom_bytes=base["capacity_bytes"] - total, status="ok")
            if formula.evaluate is peak_breakdown:
                def value(name: str, n: int = n, f: Formula = formula) -> float:
                    if name != "non_kv_bytes":
                        return jobs.value(name, SERVE_COLUMNS[name], j)
                    got, k = jobs.at(("non_kv_bytes", n), lambda c, job: (
                        lambda x: x.total - x.kv_cache)(jobs.breakdown(n, f, c, job)), j)
                    return float(got[k])

                (phases, by_phase), k = jobs.at(("moments", n), lambda c, job, f=formula: moment_report(c, f.constants), j)
                kernels, kk = jobs.at(("attn_kernel",), lambda c, job: attn_kernel_names(c), j)  # the same for every formula
                row.update(serve_fields(spec, value), peak_phase=str(phases[k]), attn_kernel=kernels[kk])
                for phase, peaks in by_phase.items():
                    peak = float(peaks[k])
                    if np.isfinite(peak):
                        check_representable(spec, f"{phase}_peak_bytes", peak)
                        row[f"{phase}_peak_bytes"] = int(round(peak))
        except ConfigError:
            raise
        except Exception as exc:  # one broken formula must not lose the others' rows
            row.update(status="error", error=f"formula {formula.name}: {type(exc).__name__}: {exc}")
        rows.append(row)
    return rows


def estimate_many(specs: Sequence[JobSpec], formulas: Sequence[Formula],
                  time=None) -> list[list[dict[str, Any]] | Exception]:
    """`estimate_rows` of many jobs with the same formulas, evaluated together: each formula, each
    count and the time model run once on all the jobs' columns. Per job, in order: its rows, or
    the exception `estimate_rows` raises for it (a ConfigError: a count no row can hold)."""
    out: list[list[dict[str, Any]] | Exception] = []
    modelled: list[int] = []
    for i, spec in enumerate(specs):
        try:
            out.append(_unmodelled_rows(spec, formulas) if spec.model.unmodelled else [])
            if not spec.model.unmodelled:
                modelled.append(i)
        except Exception as exc:  # noqa: BLE001 (the job's own error)
            out.append(exc)
    try:
        jobs = _Jobs([specs[i] for i in modelled], time) if modelled else None
    except Exception:  # noqa: BLE001 (a job whose values make no columns: it fails alone)
        ok = []
        for i in modelled:
            try:
                Columns.from_specs([specs[i]])
                ok.append(i)
            except Exception as exc:  # noqa: BLE001
                out[i] = exc
        modelled = ok
        jobs = _Jobs([specs[i] for i in modelled], time) if modelled else None
    if jobs is None:
        return out
    for j, i in enumerate(modelled):
        try:
            out[i] = _job_rows(jobs, j, formulas)
        except Exception as exc:  # noqa: BLE001 (the job's own error, as estimate_rows raises it)
            out[i] = exc
    return out


def estimate_rows(spec: JobSpec, formulas: Sequence[Formula], time=None) -> list[dict[str, Any]]:
    """Evaluate every formula on one job. A formula that raises becomes an error row of its own;
    a count no row can hold is a ConfigError for the whole job. A model no formula models gets a
    row per formula with status `unsupported` and the reason, and no estimate. `time`: the time
    model's constants (None: the built-in defaults)."""
    (rows,) = estimate_many([spec], formulas, time)
    if isinstance(rows, Exception):
        raise rows
    return rows
