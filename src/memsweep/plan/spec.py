"""The plan's inputs: `PlanSpec` (conf/plan.yaml as values) and every check that can reject one,
each a one-line ConfigError naming the key, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from memsweep.capacity import DEFAULT_MARGIN, capacity_bytes, check_margin
from memsweep.errors import ConfigError
from memsweep.formulas import get_formula
from memsweep.presets import load_preset, preset_names
from memsweep.specs import ATTENTIONS, RECOMPUTES, Hardware, KV_DTYPES, MIXED_POLICIES, check_choice, check_int
from memsweep.units import MIB, SWEEP_DTYPES

MAX_BATCH_LIMIT = 2**20
MAX_SEQ_LIMIT = 2**27

OFFLOADS = ("none", "activations", "optimizer", "params")
"""What a plan may move to CPU RAM, cheapest first: `activations` (torchtune's offloaded
checkpoints, with recompute=full), `optimizer` (ZeRO-Offload / FSDP CPUOffload: states, fp32
master, gradients), `params` (the 16-bit weights too)."""

ZEROS = (0, 1, 2, 3)
OBJECTIVES = ("fewest_gpus", "fastest")


@dataclass(frozen=True)
class Layouts:
    """What the fewest-GPUs search may combine: tensor x pipeline x data parallel ranks (gpus =
    tp x pp x dp), the ZeRO stages of the data-parallel ranks, and expert parallelism over them
    (MoE models only: ep divides dp and the experts)."""

    tp: tuple[int, ...] = (1, 2, 4, 8)
    pp: tuple[int, ...] = (1, 2, 4, 8, 16)
    dp: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    zero: tuple[int, ...] = ZEROS
    ep: tuple[int, ...] = (1, 2, 4, 8)

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "dp", "ep"):
            _check_int_list(f"layouts.{key}", getattr(self, key))
        zero = self.zero
        if not isinstance(zero, tuple) or not zero or any(isinstance(z, bool) or z not in ZEROS for z in zero):
            raise ConfigError("layouts.zero", _show(zero), "a non-empty list of 0, 1, 2, 3")


@dataclass(frozen=True)
class PlanSpec:
    """What to plan."""

    models: tuple[str, ...] = ("llama3.2-1b", "llama3-8b", "mistral-7b", "qwen2.5-14b", "llama2-70b")
    hardware: tuple[str, ...] = ("rtx4090-24g", "a100-40g", "a100-80g", "h100-80g", "h200-141g")
    seqs: tuple[int, ...] = (512, 2048, 8192, 32768)
    workloads: tuple[str, ...] = ("train", "lora", "inference")
    precisions: tuple[str, ...] = ("bf16-mixed",)
    """`dtype` or `dtype-mixed` / `dtype-pure`; mixed applies to 16-bit training only, so for
    inference `bf16-mixed` is plain bf16. A bare 16-bit dtype means mixed (the sweep's default)."""
    optimizer: str = "adamw"
    recompute: tuple[str, ...] = ("none", "selective", "full")
    """Recompute options the search may use, tried cheapest first (none < selective < op < full;
    op, torchtitan's per-op selective checkpointing, is not in the default: a user adds it)."""
    offload: tuple[str, ...] = ("none",)
    """Offload options the search may use (OFFLOADS), cheapest first; each costs CPU RAM and time,
    so none is the default and a user adds them."""
    attention: str = "sdpa"
    loss_chunks: int = 1
    """Training's cross-entropy in N chunks (torchtune's chunked output loss)."""
    kv_dtype: str = "auto"
    mixed_policy: str = "autocast"
    kernels: str = "eager"
    """The kernels a training step runs (conf/kernels/: eager, liger, flash_attn, te, compile)."""
    parallel: str = "single"
    """Layout (conf/parallel/) of the largest-batch and longest-sequence tables; memory is per GPU."""
    formula: str = "detailed"
    margin: float = DEFAULT_MARGIN
    """Safety margin: plan to fill at most (1 - margin) of the usable memory (memsweep.capacity)."""
    reserved_mib: int | None = None
    """MiB kept back on every GPU (CUDA context, driver, workspaces); None: each preset's own."""
    max_batch: int = 4096
    max_seq: int = 1_048_576
    """Search cap for the longest sequence (also beyond a model's context with rope_scaling)."""
    rope_scaling: float | None = None
    """None: a sequence never exceeds the model's context (`max_positions`); a factor >= 1: RoPE
    scaling (linear, NTK, YaRN) stretches it to factor x max_positions. Learned positions never
    stretch."""
    batches: tuple[int, ...] = (1,)
    gpus_batch: int = 1
    """Micro-batch per GPU of the fewest-GPUs table (when global_batch is null)."""
    global_batch: int | None = None
    """Sequences per optimizer step: the fewest-GPUs search splits it into dp x micro-batch x
    gradient accumulation and takes the largest micro-batch that fits."""
    min_saving: float = 0.02
    """A data-parallel layout is only worth its GPUs when doubling dp saves at least this share of
    the capacity per GPU (LoRA's ZeRO shards are tiny: no dp=64 for a 0.0 GiB saving)."""
    layouts: Layouts = field(default_factory=Layouts)
    sequence_parallel: bool = False
    """Tensor-parallel training layouts also split the norms' and residual stream's activations
    over the sequence (Korthikanti et al. 2022; Megatron's --sequence-parallel, torchtitan's
    SequenceParallel), where tp divides the sequence."""
    objective: str = "fewest_gpus"
    """fewest_gpus: the fewest-GPUs table answers by the stated order; fastest: the layout that
    trains (or serves) fastest, by estimated tokens/s over all its GPUs, within a GPU budget:
    `max_gpus`, or without it the fewest whole nodes that fit (the fewest-GPUs answer rounded up to
    the hardware's `gpus_per_node`), never the largest layout searched (search.py says why)."""
    max_gpus: int | None = None
    """At most this many GPUs per answer (null: the largest layout; for fastest, the fewest whole
    nodes that fit)."""
    tokens: float | None = None
    """A token budget (e.g. 1e12): tables give the GPU-hours it takes at each answer's speed."""
    results: str | None = None
    """A results.parquet with measure=cuda rows to compare the predicted boundary with."""
    time: str | None = None
    """The time model's constants: None (the built-in defaults) or the path of a
    time_calibrated.yaml (scripts/fit.py --calibrate), as the sweep's `time`."""

    def __post_init__(self) -> None:
        for key, group in (("models", "model"), ("hardware", "hardware"), ("workloads", "workload")):
            _check_names(key, getattr(self, key), preset_names(group))
        _check_int_list("seqs", self.seqs)
        _check_int_list("batches", self.batches)
        if not isinstance(self.precisions, tuple) or not self.precisions:
            raise ConfigError("precisions", _show(self.precisions), "a non-empty list of dtype[-mixed|-pure]")
        for p in self.precisions:
            parse_precision(p)
        _check_names("optimizer", (self.optimizer,), preset_names("optimizer"))
        _check_names("parallel", (self.parallel,), preset_names("parallel"))
        _check_names("recompute", self.recompute, list(RECOMPUTES))
        _check_names("offload", self.offload, list(OFFLOADS))
        check_choice("attention", self.attention, ATTENTIONS)
        check_choice("kv_dtype", self.kv_dtype, KV_DTYPES)
        check_choice("mixed_policy", self.mixed_policy, MIXED_POLICIES)
        check_int("loss_chunks", self.loss_chunks)
        _check_names("kernels", (self.kernels,), preset_names("kernels"))
        get_formula(self.formula, key="formula")
        check_margin(self.margin)
        if not isinstance(self.sequence_parallel, bool):
            raise ConfigError("sequence_parallel", self.sequence_parallel, "true or false")
        if (isinstance(self.min_saving, bool) or not isinstance(self.min_saving, (int, float))
                or not 0 <= self.min_saving < 1):
            raise ConfigError("min_saving", self.min_saving, "a number in [0, 1), e.g. 0.02")
        if self.rope_scaling is not None and (isinstance(self.rope_scaling, bool)
                                              or not isinstance(self.rope_scaling, (int, float))
                                              or not 1 <= self.rope_scaling <= 1024):
            raise ConfigError("rope_scaling", self.rope_scaling,
                              "null (sequences stop at the model's max_positions) or a factor from 1 to 1024")
        if self.reserved_mib is not None:
            check_int("reserved_mib", self.reserved_mib, minimum=0)
        for key in ("max_batch", "max_seq", "gpus_batch"):
            check_int(key, getattr(self, key))
        if self.global_batch is not None:
            check_int("global_batch", self.global_batch)
        # search bounds far past any GPU, and below what int64 byte counts can hold
        for key, limit in (("max_batch", MAX_BATCH_LIMIT), ("max_seq", MAX_SEQ_LIMIT)):
            if getattr(self, key) > limit:
                raise ConfigError(key, getattr(self, key), f"an integer from 1 to {limit:,}")
        for key, bound in (("gpus_batch", "max_batch"), ("batches", "max_batch"), ("seqs", "max_seq"),
                           ("global_batch", "max_batch")):
            values, limit = getattr(self, key), getattr(self, bound)
            if values is not None and max(values if isinstance(values, tuple) else (values,)) > limit:
                raise ConfigError(key, _show(values), f"integers from 1 to {bound}={limit:,}")
        check_choice("objective", self.objective, OBJECTIVES)
        if self.max_gpus is not None:
            check_int("max_gpus", self.max_gpus)
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, (int, float))
                                        or not 1 <= self.tokens < 1e18):
            raise ConfigError("tokens", self.tokens, "null or a number of tokens from 1 to 1e18, e.g. 1e12")
        if not isinstance(self.layouts, Layouts):
            raise ConfigError("layouts", self.layouts, "a mapping with tp, pp, dp, zero, ep")
        if self.results is not None and not (isinstance(self.results, str) and Path(self.results).is_file()):
            raise ConfigError("results", self.results, "null or the path of an existing results.parquet")
        self.time_constants()
        self.hardware_specs()  # a reserve larger than a GPU's memory fails here, not later

    def time_constants(self):
        """The `time` key's TimeConstants (a one-line ConfigError naming `time` when it is bad)."""
        from memsweep.formulas.timing import constants_option

        return constants_option(self.time, key="time")

    def hardware_specs(self) -> list[Hardware]:
        if self.reserved_mib is None:
            return [Hardware(**load_preset("hardware", n)) for n in self.hardware]
        presets = [load_preset("hardware", n, reserved_mib=self.reserved_mib) for n in self.hardware]
        smallest = min(p["memory_mib"] for p in presets)
        if self.reserved_mib >= smallest:
            raise ConfigError("reserved_mib", self.reserved_mib,
                              f"null or an integer >= 0 below the smallest memory_mib={smallest}")
        return [Hardware(**p) for p in presets]

    def capacity_bytes(self, hw: Hardware) -> float:
        """memsweep.capacity's definition, the sweep's `fits` too."""
        return capacity_bytes(hw.memory_bytes, hw.reserved_mib * MIB, self.margin)


def _show(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _check_int_list(key: str, values: object) -> None:
    if not isinstance(values, tuple) or not values:
        raise ConfigError(key, _show(values), "a non-empty list of integers >= 1")
    for v in values:
        check_int(key, v)


def _check_names(key: str, values: object, allowed: list[str]) -> None:
    if not isinstance(values, tuple) or not values:
        raise ConfigError(key, _show(values), f"a non-empty list of: {', '.join(allowed)}")
    for v in values:
        check_choice(key, v, tuple(allowed))


def parse_precision(label: object) -> tuple[str, str]:
    """'bf16-mixed' -> ('bf16', 'mixed'); 'int8' -> ('int8', 'pure'); 'bf16' -> ('bf16', 'mixed')."""
    allowed = "dtype[-mixed|-pure] with dtype in " + ", ".join(SWEEP_DTYPES)
    if not isinstance(label, str):
        raise ConfigError("precisions", label, allowed)
    dtype, _, mode = label.partition("-")
    if dtype not in SWEEP_DTYPES or mode not in ("", "mixed", "pure"):
        raise ConfigError("precisions", label, allowed)
    if mode == "mixed" and dtype not in ("fp16", "bf16"):
        raise ConfigError("precisions", label, f"{dtype} or {dtype}-pure (mixed precision is 16-bit training: fp16, bf16)")
    return dtype, mode or ("mixed" if dtype in ("fp16", "bf16") else "pure")


def sequence_parallel_applies(spec: PlanSpec, training, tp, seq):
    """Where the plan's `sequence_parallel` gives a layout sequence parallel: training over tp > 1
    ranks that divide the sequence (Megatron-LM and torchtitan require it). Scalars or arrays."""
    return spec.sequence_parallel & (tp > 1) & training & (seq % tp == 0)


PLAN_KEYS = tuple(f.name for f in fields(PlanSpec))
LAYOUT_KEYS = tuple(f.name for f in fields(Layouts))
LIST_KEYS = ("models", "hardware", "seqs", "workloads", "precisions", "batches", "recompute", "offload")


def plan_spec_from_dict(values: Mapping[str, Any]) -> PlanSpec:
    """A PlanSpec from plain values (a resolved config): lists become tuples, a single value where
    a list is expected is a list of one (`recompute=full`), unknown keys fail."""
    d = dict(values)
    for key in d:
        if key not in PLAN_KEYS:
            raise ConfigError(key, d[key], f"plan keys: {', '.join(PLAN_KEYS)}")
    for key in LIST_KEYS:
        if key in d:
            single = key in ("recompute", "offload") and isinstance(d[key], str)
            d[key] = tuple(dict.fromkeys((d[key],) if single else _as_tuple(key, d[key])))  # repeats add nothing
    for key in ("seqs", "batches"):  # tables read left to right, shortest first
        if key in d and all(isinstance(v, int) and not isinstance(v, bool) for v in d[key]):
            d[key] = tuple(sorted(d[key]))
    if isinstance(d.get("tokens"), str):  # YAML reads 1e12 (no dot) as a string
        try:
            d["tokens"] = float(d["tokens"])
        except ValueError:
            pass  # PlanSpec names it in one line
    if "layouts" in d:
        lay = d["layouts"]
        if not isinstance(lay, Mapping):
            raise ConfigError("layouts", lay, "a mapping with tp, pp, dp, zero, ep")
        for k in lay:
            if k not in LAYOUT_KEYS:
                raise ConfigError(f"layouts.{k}", _show(lay[k]), f"layouts keys: {', '.join(LAYOUT_KEYS)}")
        d["layouts"] = Layouts(**{k: (v,) if k == "zero" and isinstance(v, int) else _as_tuple(f"layouts.{k}", v)
                                  for k, v in lay.items()})
    return PlanSpec(**d)


def _as_tuple(key: str, value: object) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise ConfigError(key, value, "a list, e.g. [a, b]")
