"""Frozen, validated specs: the typed form of one sweep job.

Every check that can reject user input lives here, so a bad value fails in one place with a
one-line `ConfigError` naming the key, the value and what is allowed. Below this module no
config node travels; formulas see only these specs (or the numeric columns built from them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from memsweep.errors import ConfigError
from memsweep.units import DTYPE_BYTES, MIB, SWEEP_DTYPES, TRAIN_DTYPES

Family = Literal["gpt2", "llama", "bert"]
WorkloadKind = Literal["train", "inference", "lora"]
OptimizerName = Literal["adamw", "adam", "sgd", "sgd_momentum"]
Recompute = Literal["none", "selective", "full"]
Attention = Literal["eager", "sdpa"]
PrecisionMode = Literal["mixed", "pure"]

FAMILIES = ("gpt2", "llama", "bert")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")
WORKLOADS = ("train", "inference", "lora")
OPTIMIZERS = ("adamw", "adam", "sgd", "sgd_momentum")
OPTIMIZER_IMPLS = ("foreach", "forloop", "fused")
RECOMPUTES = ("none", "selective", "full")
ATTENTIONS = ("eager", "sdpa")
PRECISIONS = ("mixed", "pure")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# Optimizer state tensors kept per trainable parameter (Adam: m and v; momentum: one buffer).
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1}


def check_int(key: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}")


def check_choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, allowed)


def check_bool(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true, false")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers of a decoder (gpt2, llama) or encoder (bert) transformer."""

    name: str
    family: Family
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    max_positions: int
    norm: Literal["layernorm", "rmsnorm"]
    mlp: Literal["gelu", "swiglu"]
    position: Literal["learned", "rope"]
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    tied_embeddings: bool
    head_dim: int | None = None
    """Per-head size; None means hidden / heads (every supported family has hidden = heads * head_dim)."""
    type_vocab: int = 0
    """BERT token-type embeddings (2 for bert-*-uncased); 0 elsewhere."""
    pooler: bool = False
    """BERT pooler (a dense h x h layer with bias), counted as HF's BertModel counts it."""

    def __post_init__(self) -> None:
        check_choice("model.family", self.family, FAMILIES)
        for key in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "max_positions"):
            check_int(f"model.{key}", getattr(self, key))
        check_int("model.type_vocab", self.type_vocab, minimum=0)
        check_choice("model.norm", self.norm, NORMS)
        check_choice("model.mlp", self.mlp, MLPS)
        check_choice("model.position", self.position, POSITIONS)
        for key in ("qkv_bias", "out_bias", "mlp_bias", "tied_embeddings", "pooler"):
            check_bool(f"model.{key}", getattr(self, key))
        if self.hidden % self.heads:
            divisors = [d for d in (1, 2, 4, 8, 12, 16, 24, 32, 40, 64, 128) if self.hidden % d == 0]
            raise ConfigError(
                "model.heads", self.heads,
                f"a divisor of model.hidden={self.hidden} (e.g. {', '.join(map(str, divisors))})",
            )
        if self.head_dim is not None and self.head_dim != self.hidden // self.heads:
            raise ConfigError(
                "model.head_dim", self.head_dim,
                f"null or model.hidden / model.heads = {self.hidden // self.heads}",
            )
        if self.kv_heads > self.heads or self.heads % self.kv_heads:
            divisors = [d for d in range(1, self.heads + 1) if self.heads % d == 0]
            raise ConfigError(
                "model.kv_heads", self.kv_heads,
                f"a divisor of model.heads={self.heads}: {', '.join(map(str, divisors))}",
            )

    @property
    def dim_per_head(self) -> int:
        return self.hidden // self.heads

    @property
    def decoder(self) -> bool:
        return self.family != "bert"


@dataclass(frozen=True)
class Workload:
    """What one job runs: a training step, LoRA fine-tuning step, or prefill + decode inference."""

    name: str
    kind: WorkloadKind
    gen_tokens: int = 0
    """Inference only: tokens decoded after the prompt (the prompt is `seq` tokens)."""
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice("workload.kind", self.kind, WORKLOADS)
        check_int("workload.gen_tokens", self.gen_tokens, minimum=0)
        if self.kind == "lora":
            check_int("workload.lora_rank", self.lora_rank)
            if not self.lora_targets:
                raise ConfigError("workload.lora_targets", list(self.lora_targets), LORA_TARGETS)
            for target in self.lora_targets:
                check_choice("workload.lora_targets", target, LORA_TARGETS)
            if len(set(self.lora_targets)) != len(self.lora_targets):
                raise ConfigError("workload.lora_targets", list(self.lora_targets), "distinct names")

    @property
    def training(self) -> bool:
        return self.kind != "inference"


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimizer used by training workloads; `impl` mirrors PyTorch's foreach/for-loop/fused choice."""

    name: OptimizerName
    impl: Literal["foreach", "forloop", "fused"] = "foreach"

    def __post_init__(self) -> None:
        check_choice("optimizer.name", self.name, OPTIMIZERS)
        check_choice("optimizer.impl", self.impl, OPTIMIZER_IMPLS)

    @property
    def states_per_param(self) -> int:
        return OPTIMIZER_STATES[self.name]


@dataclass(frozen=True)
class Parallel:
    """Parallel layout; every memory figure memsweep reports is per GPU."""

    name: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "dp"):
            check_int(f"parallel.{key}", getattr(self, key))
        if self.zero not in (0, 1, 2, 3) or isinstance(self.zero, bool):
            raise ConfigError("parallel.zero", self.zero, "0, 1, 2, 3")
        check_bool("parallel.sequence_parallel", self.sequence_parallel)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class Hardware:
    """One accelerator: its total memory (as nvidia-smi reports it) and what the CUDA context,
    driver and library workspaces keep for themselves, both in MiB."""

    name: str
    memory_mib: int
    reserved_mib: int = 512

    def __post_init__(self) -> None:
        check_int("hardware.memory_mib", self.memory_mib)
        check_int("hardware.reserved_mib", self.reserved_mib, minimum=0)
        if self.reserved_mib >= self.memory_mib:
            raise ConfigError("hardware.reserved_mib", self.reserved_mib,
                              f"less than hardware.memory_mib={self.memory_mib}")

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def usable_bytes(self) -> int:
        """What a job may use: total minus the reserve (the `hardware_bytes` column)."""
        return (self.memory_mib - self.reserved_mib) * MIB


MEASURE_BACKENDS = ("none", "fake", "cpu", "cuda")


@dataclass(frozen=True)
class MeasureSpec:
    """Whether and how a job measures its configuration for real (see memsweep.measure)."""

    name: str = "none"
    backend: Literal["none", "fake", "cpu", "cuda"] = "none"
    warmup: int = 1
    """Training steps before the measured ones: step 2 is the steady state (optimizer state exists)."""
    repeats: int = 1
    """Measured steps; step time is their median."""
    max_gib: float | None = None
    """cpu only: refuse (status=skipped) a job whose `detailed` estimate exceeds this, to protect the host."""
    seed: int = 0
    isolate: bool = False
    """Run the measurement in a child process: a crash, hang or runaway memory becomes a row."""
    timeout_s: float | None = None
    """isolate only: give up (status=timeout) after this many seconds."""
    max_rss_gib: float | None = None
    """isolate only: kill the child (status=error) when its resident memory exceeds this."""

    def __post_init__(self) -> None:
        check_choice("measure.backend", self.backend, MEASURE_BACKENDS)
        check_bool("measure.isolate", self.isolate)
        for key in ("timeout_s", "max_rss_gib"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise ConfigError(f"measure.{key}", v, "null or a number > 0")
        check_int("measure.warmup", self.warmup, minimum=1)
        check_int("measure.repeats", self.repeats)
        check_int("measure.seed", self.seed, minimum=0)
        if self.max_gib is not None and (isinstance(self.max_gib, bool)
                                         or not isinstance(self.max_gib, (int, float)) or self.max_gib <= 0):
            raise ConfigError("measure.max_gib", self.max_gib, "null or a number of GiB > 0")


@dataclass(frozen=True)
class JobSpec:
    """One point of the sweep grid, validated as a whole (cross-field checks live here)."""

    model: ModelSpec
    workload: Workload
    optimizer: OptimizerSpec
    parallel: Parallel
    hardware: Hardware
    seq: int
    batch: int
    dtype: str
    precision: PrecisionMode = "mixed"
    recompute: Recompute = "none"
    attention: Attention = "sdpa"
    formulas: tuple[str, ...] = field(default=())
    measure: MeasureSpec = field(default_factory=MeasureSpec)

    def __post_init__(self) -> None:
        check_int("seq", self.seq)
        check_int("batch", self.batch)
        check_choice("dtype", self.dtype, SWEEP_DTYPES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("recompute", self.recompute, RECOMPUTES)
        check_choice("attention", self.attention, ATTENTIONS)
        m, w, p = self.model, self.workload, self.parallel
        if w.training and self.dtype not in TRAIN_DTYPES:
            raise ConfigError(
                "dtype", self.dtype,
                f"{', '.join(TRAIN_DTYPES)} for workload={w.kind} (int8/int4 are inference weight formats)",
            )
        if m.position == "learned":
            positions = self.seq + (self.gen_tokens if m.decoder else 0)
            if positions > m.max_positions:
                key, value = ("seq", self.seq) if self.seq > m.max_positions else (
                    "workload.gen_tokens", w.gen_tokens)
                raise ConfigError(
                    key, value,
                    f"seq + gen_tokens <= {m.max_positions} ({m.name} has learned positions)",
                )
        if m.heads % p.tp or m.kv_heads % p.tp:
            raise ConfigError(
                "parallel.tp", p.tp,
                f"a divisor of both model.heads={m.heads} and model.kv_heads={m.kv_heads}",
            )
        if m.layers % p.pp:
            raise ConfigError("parallel.pp", p.pp, f"a divisor of model.layers={m.layers}")
        if w.kind == "lora":
            allowed = ("q", "k", "v", "o", "gate", "up", "down") if m.mlp == "swiglu" else (
                "q", "k", "v", "o", "up", "down")
            for target in w.lora_targets:
                check_choice("workload.lora_targets", target, allowed)

    def to_dict(self) -> dict:
        """Plain data (the `spec_json` column): `JobSpec.from_dict` rebuilds this spec exactly."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        parts = {"model": ModelSpec, "optimizer": OptimizerSpec, "parallel": Parallel,
                 "hardware": Hardware, "measure": MeasureSpec}
        w = dict(d["workload"], lora_targets=tuple(d["workload"].get("lora_targets", ())))
        rest = {k: v for k, v in d.items() if k not in (*parts, "workload")}
        rest["formulas"] = tuple(rest.get("formulas", ()))
        return cls(workload=Workload(**w), **{k: t(**d[k]) for k, t in parts.items()}, **rest)

    @property
    def gen_tokens(self) -> int:
        """Decoded tokens; an encoder (bert) has no decode phase, so 0 there."""
        return self.workload.gen_tokens if (self.workload.kind == "inference" and self.model.decoder) else 0

    @property
    def mixed(self) -> bool:
        """Mixed precision applies to 16-bit training only (fp32 master weights + autocast)."""
        return self.workload.training and self.precision == "mixed" and self.dtype in ("fp16", "bf16")

    @property
    def effective_precision(self) -> PrecisionMode:
        return "mixed" if self.mixed else "pure"

    @property
    def dtype_bytes(self) -> float:
        return DTYPE_BYTES[self.dtype]
