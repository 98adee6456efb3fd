"""Cases: the plan's base rows. A case is one model x workload x precision; each of its
*variants* (recompute x offload, the memory-saving techniques the search may turn on) is one
validated JobSpec, one base row of the grids."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from memsweep.columns import Array, Columns, base_params
from memsweep.errors import ConfigError
from memsweep.plan.spec import OFFLOADS, PlanSpec, parse_precision
from memsweep.presets import job_spec, workload_spec
from memsweep.specs import RECOMPUTES, JobSpec, OffloadSpec


RECOMPUTE_COST = ("none", "selective", "op", "full")
"""RECOMPUTES by the compute they add, least first."""
assert sorted(RECOMPUTE_COST) == sorted(RECOMPUTES)


@dataclass(frozen=True)
class Variant:
    """The techniques a plan may turn on, with what they cost: offload (CPU RAM and PCIe time)
    weighs more than recompute (about a third more compute for `full`, Korthikanti et al. 2022)."""

    recompute: str = "none"
    offload: str = "none"

    @property
    def cost(self) -> int:
        """Rank of the variant: cheaper first (none < selective < op < full: op recomputes every
        block but its saved matmuls and attention; offload above all)."""
        return OFFLOADS.index(self.offload) * len(RECOMPUTES) + RECOMPUTE_COST.index(self.recompute)

    @property
    def label(self) -> str:
        """'' for no technique, else e.g. 'full' / 'sel' / 'full, offload optimizer'."""
        parts = [] if self.recompute == "none" else [{"selective": "sel"}.get(self.recompute, self.recompute)]
        parts += [] if self.offload == "none" else [f"offload {self.offload}"]
        return ", ".join(parts)

    def offload_spec(self) -> OffloadSpec:
        return OffloadSpec(optimizer=self.offload in ("optimizer", "params"), params=self.offload == "params",
                           activations=self.offload == "activations")


@dataclass(frozen=True)
class Case:
    """One model x workload x precision; `jobs` pairs each valid variant with its JobSpec (cheapest
    first) and is empty when the combination is invalid (`reason` says why)."""

    model: str
    workload: str
    dtype: str
    precision: str  # effective: mixed | pure
    jobs: tuple[tuple[Variant, JobSpec], ...]
    reason: str | None = None
    error: ConfigError | None = None  # the JobSpec's refusal itself (`ask` re-raises it under its own key)

    @property
    def label(self) -> str:
        return f"{self.workload} · {precision_label(self.workload, self.dtype, self.precision)}"

    @property
    def job(self) -> JobSpec | None:
        return self.jobs[0][1] if self.jobs else None


def precision_label(workload: str, dtype: str, precision: str) -> str:
    """'bf16 mixed', 'bf16 pure' (16-bit training); the bare dtype otherwise."""
    training = workload_spec(workload).training
    return f"{dtype} {precision}" if training and dtype in ("fp16", "bf16") else dtype


def variants(spec: PlanSpec, training: bool) -> list[Variant]:
    """The search's variants, cheapest first; a forward pass (inference, serve) has none to turn on."""
    if not training:
        return [Variant()]
    return sorted((Variant(r, o) for o in spec.offload for r in spec.recompute), key=lambda v: v.cost)


def cases(spec: PlanSpec) -> list[Case]:
    """Every model x workload x precision, each variant validated as a JobSpec (at seq 1, batch 1).
    A combination the spec rejects (int8 training, tp not dividing the heads) is kept, invalid; a
    variant that does not apply (offloaded activations without recompute=full) is left out."""
    out: list[Case] = []
    seen: set[tuple[str, str, str, str]] = set()
    for model in spec.models:
        for wl in spec.workloads:
            training = workload_spec(wl).training
            for label in spec.precisions:
                dtype, mode = parse_precision(label)
                effective = "mixed" if training and mode == "mixed" and dtype in ("fp16", "bf16") else "pure"
                key = (model, wl, dtype, effective)
                if key in seen:  # bf16-mixed and bf16-pure are one case for inference
                    continue
                seen.add(key)
                jobs, error = [], None
                for v in variants(spec, training):
                    try:
                        jobs.append((v, job_spec(
                            model, wl=wl, optimizer=spec.optimizer, parallel=spec.parallel,
                            hardware=spec.hardware[0], seq=1, batch=1, dtype=dtype, precision=mode,
                            recompute=v.recompute, attention=spec.attention, offload=v.offload_spec(),
                            **_technique_keys(spec, training))))
                    except ConfigError as exc:
                        error = error or exc
                bad = None if jobs else error
                out.append(Case(model, wl, dtype, effective, tuple(jobs), None if bad is None else str(bad), bad))
    return out


def _technique_keys(spec: PlanSpec, training: bool) -> dict:
    from memsweep.presets import load_preset
    from memsweep.specs import KernelsSpec, LossSpec

    if training:
        return {"loss": LossSpec(chunks=spec.loss_chunks), "mixed_policy": spec.mixed_policy,
                "kernels": KernelsSpec(**load_preset("kernels", spec.kernels))}
    return {"kv_dtype": spec.kv_dtype}


def context_limit(c: Columns, spec: PlanSpec) -> Array:
    """Longest valid prompt. Learned positions cap seq + gen_tokens at max_positions (gen_tokens is
    0 for encoders and training); RoPE models stop at max_positions too unless the plan asks for
    RoPE scaling (`rope_scaling` x max_positions); the search never passes `max_seq`."""
    rope = float(spec.rope_scaling or 1.0)
    stretch = np.where(c.learned_positions == 1, 1.0, rope)
    limit = np.floor(c.max_positions * stretch) - c.gen_tokens
    return np.minimum(limit, float(spec.max_seq))


@cache
def model_params(name: str) -> int:
    """Exact parameter count of a model preset (via a minimal valid job)."""
    return int(base_params(Columns.from_specs([job_spec(name, seq=1)]))[0])


def case_order(spec: PlanSpec):
    """Sections follow the config: workloads first, then precisions, in the order listed."""
    wl = {w: i for i, w in enumerate(spec.workloads)}
    pr = {parse_precision(p)[0]: i for i, p in reversed(list(enumerate(spec.precisions)))}
    return lambda c: (wl[c.workload], pr[c.dtype], c.precision)
