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

Family = Literal["gpt2", "llama", "bert", "hf"]
WorkloadKind = Literal["train", "inference", "lora"]
OptimizerName = Literal["adamw", "adam", "sgd", "sgd_momentum"]
Recompute = Literal["none", "selective", "full"]
Attention = Literal["eager", "sdpa"]
PrecisionMode = Literal["mixed", "pure"]

FAMILIES = ("gpt2", "llama", "bert")
NORMS = ("layernorm", "rmsnorm", "layernorm_nobias")
MLPS = ("gelu", "swiglu", "geglu")
BLOCKS = ("sequential", "parallel")
QK_NORMS = ("none", "head", "full")
MLA_CACHES = ("latent", "expanded")
LAYER_KINDS = ("global", "local")
GATED_MLPS = ("swiglu", "geglu")
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


def check_label(key: str, value: object) -> None:
    """A name that ends up in result rows and tables: a non-empty string on one line (a YAML
    number such as `model.name=1.5`, or an empty string, is refused rather than coerced)."""
    if not isinstance(value, str) or not value.strip() or "\n" in value:
        raise ConfigError(key, value, "a non-empty name on one line (quote numbers: model.name='\"1.5\"')")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers of a decoder (gpt2, llama) or encoder (bert) transformer.

    `family` picks the code path (gpt2: pre-norm decoder with learned positions; llama: pre-norm
    decoder, the path of every modern decoder; bert: post-norm encoder). Everything else that
    changes parameters or memory is a field of its own, so one path covers Mixtral, Gemma-2,
    Qwen3, gpt-oss, DeepSeek-V3, Falcon and GPT-NeoX (see docs/models.md)."""

    name: str
    family: Family
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    max_positions: int
    norm: Literal["layernorm", "rmsnorm", "layernorm_nobias"]
    mlp: Literal["gelu", "swiglu", "geglu"]
    position: Literal["learned", "rope"]
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    tied_embeddings: bool
    head_dim: int | None = None
    """Per-head size of queries and keys; None means hidden / heads. Gemma, Qwen3, Mistral-NeMo
    and gpt-oss set it explicitly (heads x head_dim != hidden)."""
    type_vocab: int = 0
    """BERT token-type embeddings (2 for bert-*-uncased); 0 elsewhere."""
    pooler: bool = False
    """BERT pooler (a dense h x h layer with bias), counted as HF's BertModel counts it."""
    rotary_fraction: float = 1.0
    """Fraction of each head's dimensions that rotary embeddings rotate (GPT-NeoX: 0.25)."""
    # --- block layout -------------------------------------------------------------------------
    block: Literal["sequential", "parallel"] = "sequential"
    """parallel: x + attn(norm(x)) + mlp(norm(x)) (GPT-NeoX, Falcon, Cohere), one residual add."""
    block_norms: int = 2
    """Norms per block: 2 (pre-attention, pre-MLP), 1 (one shared norm of a parallel block: Falcon-7B,
    Cohere), 4 (Gemma-2/3: also a norm after attention and after the MLP)."""
    qk_norm: Literal["none", "head", "full"] = "none"
    """Norms on queries and keys: per head over head_dim (Qwen3, Gemma-3) or over all heads (OLMoE)."""
    # --- mixture of experts -------------------------------------------------------------------
    experts: int = 0
    """Routed experts per MoE layer; 0 is a dense model."""
    experts_per_token: int = 0
    """Top-k: routed experts each token is sent to."""
    expert_ffn: int = 0
    """Hidden size of one routed expert's MLP (moe_intermediate_size); 0 means `ffn`."""
    shared_experts: int = 0
    """Experts every token goes through (DeepSeek, Qwen2-MoE), each of `shared_ffn`."""
    shared_ffn: int = 0
    """Hidden size of one shared expert; 0 means `expert_ffn`."""
    shared_expert_gate: bool = False
    """Qwen2-MoE: a sigmoid gate (an h x 1 linear) scales the shared expert's output."""
    dense_layers: int = 0
    """Layers with a dense MLP of size `ffn` instead of experts (DeepSeek's first k layers)."""
    router_bias: bool = False
    """The router has a bias (gpt-oss) or a per-expert correction bias (DeepSeek-V3)."""
    # --- attention layout ---------------------------------------------------------------------
    sliding_window: int = 0
    """Window of the local layers in tokens; 0: no local layers."""
    layer_pattern: tuple[str, ...] = ("global",)
    """global / local per layer, repeated over the layers: Mistral-7B-v0.1 (local), Gemma-2 and
    gpt-oss (local, global), Gemma-3 (5 x local, global)."""
    attention_sinks: bool = False
    """gpt-oss: one learned sink logit per head, in every layer's softmax."""
    q_lora_rank: int = 0
    """Multi-head latent attention (DeepSeek-V2/V3): rank of the query compression; 0: a plain q."""
    kv_lora_rank: int = 0
    """MLA: rank of the joint key-value compression; 0: not MLA."""
    rope_head_dim: int = 0
    """MLA: the rotary part of each query/key head (qk_rope_head_dim); head_dim is nope + rope."""
    v_head_dim: int = 0
    """MLA: per-head size of values; 0 means head_dim."""
    mla_cache: Literal["latent", "expanded"] = "latent"
    """MLA inference: the KV cache keeps the compressed latent (kv_lora_rank + rope_head_dim per
    token, as vLLM and SGLang do) or the expanded keys and values (as a plain implementation does)."""
    source: str = ""
    """The local config.json this spec was read from at run time (`model=hf model.config=PATH`);
    `measure.impl=hf` builds the transformers model from that file itself. Empty for presets."""
    unmodelled: str = ""
    """Why no formula models this config.json: the importer's refusal (`model=hf model.config=PATH`
    with `measure.impl=hf` measures it anyway). Its family is `hf` (only transformers knows the
    architecture); the numbers above are what the config's common keys say, or 1, and nothing
    computes with them. Its rows carry the measurement and status `unsupported`, no estimate."""

    def __post_init__(self) -> None:
        check_label("model.name", self.name)
        if self.family == "hf" or self.unmodelled:
            if not (self.family == "hf" and self.unmodelled and self.source):
                raise ConfigError("model.family", self.family,
                                  f"{', '.join(FAMILIES)} (family hf is only a config.json no formula models, "
                                  "read by model=hf model.config=PATH)")
            return
        check_choice("model.family", self.family, FAMILIES)
        for key in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "max_positions"):
            check_int(f"model.{key}", getattr(self, key))
        for key in ("type_vocab", "experts", "experts_per_token", "expert_ffn", "shared_experts",
                    "shared_ffn", "dense_layers", "sliding_window", "q_lora_rank", "kv_lora_rank",
                    "rope_head_dim", "v_head_dim"):
            check_int(f"model.{key}", getattr(self, key), minimum=0)
        check_choice("model.norm", self.norm, NORMS)
        check_choice("model.mlp", self.mlp, MLPS)
        check_choice("model.position", self.position, POSITIONS)
        check_choice("model.block", self.block, BLOCKS)
        check_choice("model.qk_norm", self.qk_norm, QK_NORMS)
        check_choice("model.mla_cache", self.mla_cache, MLA_CACHES)
        for key in ("qkv_bias", "out_bias", "mlp_bias", "tied_embeddings", "pooler",
                    "shared_expert_gate", "router_bias", "attention_sinks"):
            check_bool(f"model.{key}", getattr(self, key))
        allowed_norms = (1, 2) if self.block == "parallel" else (2, 4)
        if self.block_norms not in allowed_norms or isinstance(self.block_norms, bool):
            raise ConfigError("model.block_norms", self.block_norms,
                              f"{' or '.join(map(str, allowed_norms))} for model.block={self.block}")
        if self.head_dim is None:
            if self.hidden % self.heads:
                divisors = [d for d in (1, 2, 4, 8, 12, 16, 24, 32, 40, 64, 128) if self.hidden % d == 0]
                raise ConfigError(
                    "model.heads", self.heads,
                    f"a divisor of model.hidden={self.hidden} (e.g. {', '.join(map(str, divisors))}), "
                    "or set model.head_dim")
        else:
            check_int("model.head_dim", self.head_dim)
        if self.kv_heads > self.heads or self.heads % self.kv_heads:
            divisors = [d for d in range(1, self.heads + 1) if self.heads % d == 0]
            raise ConfigError(
                "model.kv_heads", self.kv_heads,
                f"a divisor of model.heads={self.heads}: {', '.join(map(str, divisors))}",
            )
        if (isinstance(self.rotary_fraction, bool) or not isinstance(self.rotary_fraction, (int, float))
                or not 0 < self.rotary_fraction <= 1):
            raise ConfigError("model.rotary_fraction", self.rotary_fraction, "a number in (0, 1]")
        if self.position == "rope" and self.rope_dim % 2:
            raise ConfigError("model.head_dim", self.dim_per_head,
                              "an even number (rotary embeddings rotate pairs of dimensions)")
        self._check_moe()
        self._check_attention_layout()
        if self.family == "bert" and (self.experts or self.kv_lora_rank or self.block != "sequential"
                                      or self.local_layers or self.attention_sinks):
            raise ConfigError("model.family", self.family,
                              "gpt2 or llama for MoE, MLA, parallel blocks, local layers or sinks "
                              "(the bert path is the classic post-norm encoder)")

    def _check_moe(self) -> None:
        if not self.experts:
            for key in ("experts_per_token", "expert_ffn", "shared_experts", "shared_ffn", "dense_layers"):
                if getattr(self, key):
                    raise ConfigError(f"model.{key}", getattr(self, key), "0 when model.experts=0 (a dense model)")
            for key in ("shared_expert_gate", "router_bias"):
                if getattr(self, key):
                    raise ConfigError(f"model.{key}", True, "false when model.experts=0 (a dense model)")
            return
        if not 1 <= self.experts_per_token <= self.experts:
            raise ConfigError("model.experts_per_token", self.experts_per_token,
                              f"an integer in 1..model.experts={self.experts}")
        if self.dense_layers >= self.layers:
            raise ConfigError("model.dense_layers", self.dense_layers,
                              f"fewer than model.layers={self.layers} (at least one MoE layer)")
        if self.shared_expert_gate and not self.shared_experts:
            raise ConfigError("model.shared_expert_gate", True, "false without model.shared_experts")
        if self.shared_ffn and not self.shared_experts:
            raise ConfigError("model.shared_ffn", self.shared_ffn, "0 without model.shared_experts")

    def _check_attention_layout(self) -> None:
        pattern = self.layer_pattern
        if isinstance(pattern, str) or not isinstance(pattern, (tuple, list)) or not pattern:
            raise ConfigError("model.layer_pattern", pattern, "a non-empty list of global, local")
        for kind in pattern:
            check_choice("model.layer_pattern", kind, LAYER_KINDS)
        if len(pattern) > self.layers:
            raise ConfigError("model.layer_pattern", list(pattern),
                              f"at most model.layers={self.layers} entries (repeated over the layers)")
        if "local" in pattern and not self.sliding_window:
            raise ConfigError("model.sliding_window", self.sliding_window,
                              "an integer >= 1 when model.layer_pattern has local layers")
        if self.sliding_window and "local" not in pattern:
            raise ConfigError("model.layer_pattern", list(pattern),
                              "a pattern with local layers when model.sliding_window > 0")
        if self.kv_lora_rank:
            if not 0 < self.rope_head_dim < self.dim_per_head:
                raise ConfigError("model.rope_head_dim", self.rope_head_dim,
                                  f"an integer in 1..model.head_dim-1={self.dim_per_head - 1} for MLA")
            if self.kv_heads != self.heads:
                raise ConfigError("model.kv_heads", self.kv_heads,
                                  f"model.heads={self.heads} for MLA (every head has its own keys)")
            if self.qkv_bias or self.qk_norm != "none" or self.attention_sinks:
                raise ConfigError("model.kv_lora_rank", self.kv_lora_rank,
                                  "0 with qkv_bias, qk_norm or attention_sinks (MLA has none of them)")
        else:
            for key in ("q_lora_rank", "rope_head_dim", "v_head_dim"):
                if getattr(self, key):
                    raise ConfigError(f"model.{key}", getattr(self, key), "0 without MLA (model.kv_lora_rank=0)")

    @property
    def dim_per_head(self) -> int:
        """Query / key head size."""
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def value_dim(self) -> int:
        """Value head size (differs from dim_per_head only in MLA)."""
        return self.v_head_dim or self.dim_per_head

    @property
    def rope_dim(self) -> int:
        """Dimensions of each head that rotary embeddings rotate."""
        return self.rope_head_dim if self.kv_lora_rank else int(self.dim_per_head * self.rotary_fraction)

    @property
    def decoder(self) -> bool:
        return self.family != "bert"

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.experts else 0

    @property
    def routed_ffn(self) -> int:
        return self.expert_ffn or self.ffn

    @property
    def shared_ffn_total(self) -> int:
        """Hidden size of all shared experts together (they run as one MLP)."""
        return self.shared_experts * (self.shared_ffn or self.routed_ffn)

    def layer_kinds(self) -> tuple[str, ...]:
        """global / local for every layer (the pattern repeated)."""
        p = self.layer_pattern
        return tuple(p[i % len(p)] for i in range(self.layers))

    @property
    def local_layers(self) -> int:
        return sum(k == "local" for k in self.layer_kinds()) if self.sliding_window else 0


@dataclass(frozen=True)
class Workload:
    """What one job runs: a training step, LoRA fine-tuning step, or prefill + decode inference."""

    name: str
    kind: WorkloadKind
    gen_tokens: int = 0
    """Inference only: tokens decoded after the prompt (the prompt is `seq` tokens)."""
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    use_cache: bool = True
    """Training: the forward also fills a KV cache, held until the loss is computed (transformers'
    default, `use_cache=True`; it is off under gradient checkpointing). False: a model with
    `config.use_cache=False`. Inference always uses one."""

    def __post_init__(self) -> None:
        check_label("workload.name", self.name)
        check_choice("workload.kind", self.kind, WORKLOADS)
        check_int("workload.gen_tokens", self.gen_tokens, minimum=0)
        check_bool("workload.use_cache", self.use_cache)
        if self.kind == "inference" and not self.use_cache:
            raise ConfigError("workload.use_cache", self.use_cache, "true for workload kind inference (decoding reads the cache)")
        # a value the workload would ignore is refused: the row would not be what the user asked
        if self.kind != "inference" and self.gen_tokens:
            raise ConfigError("workload.gen_tokens", self.gen_tokens, f"0 for workload kind {self.kind} (inference only)")
        if self.kind != "lora":
            if self.lora_rank != 0:
                raise ConfigError("workload.lora_rank", self.lora_rank,
                                  f"0 for workload kind {self.kind} (adapters belong to a lora workload: workload=lora)")
            if self.lora_targets:
                raise ConfigError("workload.lora_targets", list(self.lora_targets),
                                  f"[] for workload kind {self.kind} (adapters belong to a lora workload: workload=lora)")
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
    ep: int = 1
    """Expert parallelism: the routed experts are split over `ep` of the `dp` ranks (as in
    Megatron-Core and DeepSpeed-MoE), so ep divides dp and adds no GPUs."""

    def __post_init__(self) -> None:
        check_label("parallel.name", self.name)
        for key in ("tp", "pp", "dp", "ep"):
            check_int(f"parallel.{key}", getattr(self, key))
        if self.dp % self.ep:
            raise ConfigError("parallel.ep", self.ep, f"a divisor of parallel.dp={self.dp} (experts are split over data-parallel ranks)")
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
        check_label("hardware.name", self.name)
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
    impl: Literal["reference", "hf"] = "reference"
    """What runs: memsweep's reference models, or the Hugging Face transformers model (issue 12)."""

    def __post_init__(self) -> None:
        check_label("measure.name", self.name)
        check_choice("measure.backend", self.backend, MEASURE_BACKENDS)
        check_choice("measure.impl", self.impl, ("reference", "hf"))
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


def model_fields(values: dict) -> dict:
    """ModelSpec keyword arguments from plain data (YAML, JSON): lists become tuples."""
    pattern = values.get("layer_pattern")
    if isinstance(pattern, list):
        return {**values, "layer_pattern": tuple(pattern)}
    return dict(values)


def lora_targets_of(m: ModelSpec) -> tuple[str, ...]:
    """Matrices LoRA can adapt: gate only in gated MLPs; in MoE layers gate / up / down adapt every
    routed and shared expert. In MLA, q adapts q_a and q_b (or q_proj), k the joint projection
    kv_a_proj_with_mqa, v the expansion kv_b_proj (the modules PEFT users target in DeepSeek)."""
    mlp = ("gate", "up", "down") if m.mlp in GATED_MLPS else ("up", "down")
    return ("q", "k", "v", "o", *mlp)


def lora_matrix_shapes(m: ModelSpec, target: str) -> list[tuple[int, int]]:
    """(d_in, d_out) of every matrix one LoRA target adapts (see `lora_targets_of`)."""
    h, a, d, kv = m.hidden, m.heads, m.dim_per_head, m.kv_heads
    if m.mla:
        nope = d - m.rope_head_dim
        attn = {"q": [(h, m.q_lora_rank), (m.q_lora_rank, a * d)] if m.q_lora_rank else [(h, a * d)],
                "k": [(h, m.kv_lora_rank + m.rope_head_dim)], "v": [(m.kv_lora_rank, a * (nope + m.value_dim))]}
    else:
        attn = {"q": [(h, a * d)], "k": [(h, kv * d)], "v": [(h, kv * d)]}
    attn["o"] = [(a * m.value_dim, h)]
    if target in attn:
        return attn[target]
    ffns = ([m.ffn] if m.layers > m.moe_layers else []) + ([m.routed_ffn] if m.moe_layers else [])
    ffns += [m.shared_ffn_total] if m.moe_layers and m.shared_ffn_total else []
    return [(f, h) if target == "down" else (h, f) for f in ffns]


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
    formula_constants: tuple[tuple[str, float], ...] = ()
    """The constants of the `formula` group option (`formula=X formula.constants.k=v`), applied to
    the formula of that name in `formulas` (it is in the row's spec_json)."""
    formula_option: str | None = None
    """Which formula (by name) `formula_constants` belong to, and `formula_base` its estimator."""
    formula_base: str | None = None

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
        if m.unmodelled:
            self._check_unmodelled()
            return
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
        if m.experts and m.experts % p.ep:
            raise ConfigError("parallel.ep", p.ep, f"a divisor of model.experts={m.experts}")
        if p.ep > 1 and not m.experts:
            raise ConfigError("parallel.ep", p.ep, f"1 for a dense model ({m.name} has no experts)")
        if w.kind == "lora":
            allowed = lora_targets_of(m)
            for target in w.lora_targets:
                check_choice("workload.lora_targets", target, allowed)
            # B A has rank <= min(d_in, d_out): a larger rank adds parameters and no capacity
            limit, target, shape = min(((min(s), t, s) for t in w.lora_targets for s in lora_matrix_shapes(m, t)),
                                        key=lambda x: x[0])  # the first target at the limit
            if w.lora_rank > limit:
                raise ConfigError("workload.lora_rank", w.lora_rank,
                                  f"at most {limit} for {m.name} ({target}: {shape[0]} x {shape[1]}; "
                                  f"a rank beyond a matrix's smaller side adds nothing)")

    def _check_unmodelled(self) -> None:
        """A model no formula models has only a measurement: transformers' own, on one device."""
        if self.measure.backend == "none" or self.measure.impl != "hf":
            raise ConfigError("model.config", self.model.source,
                              f"a model_type memsweep models ({self.model.unmodelled}); or measure it with "
                              "transformers alone: measure=fake measure.impl=hf")
        for target in self.workload.lora_targets if self.workload.kind == "lora" else ():
            check_choice("workload.lora_targets", target, LORA_TARGETS)

    def to_dict(self) -> dict:
        """Plain data (the `spec_json` column): `JobSpec.from_dict` rebuilds this spec exactly."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        parts = {"model": ModelSpec, "optimizer": OptimizerSpec, "parallel": Parallel,
                 "hardware": Hardware, "measure": MeasureSpec}
        w = dict(d["workload"], lora_targets=tuple(d["workload"].get("lora_targets", ())))
        d = dict(d, model=model_fields(d["model"]))
        rest = {k: v for k, v in d.items() if k not in (*parts, "workload")}
        rest["formulas"] = tuple(rest.get("formulas", ()))
        rest["formula_constants"] = tuple((k, float(v)) for k, v in rest.get("formula_constants", ()))
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
