"""Frozen, validated specs: the typed form of one sweep job.

Every check that can reject user input lives here, so a bad value fails in one place with a
one-line `ConfigError` naming the key, the value and what is allowed. Below this module no
config node travels; formulas see only these specs (or the numeric columns built from them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from memsweep.capacity import check_margin
from memsweep.errors import ConfigError
from memsweep.units import DTYPE_BYTES, MIB, SWEEP_DTYPES, TRAIN_DTYPES

Family = Literal["gpt2", "llama", "bert", "hf"]
WorkloadKind = Literal["train", "inference", "lora", "serve"]
OptimizerName = Literal["adamw", "adam", "sgd", "sgd_momentum", "adamw8bit", "paged_adamw8bit", "adafactor", "lion"]
Recompute = Literal["none", "selective", "full", "op"]
Attention = Literal["eager", "sdpa"]
PrecisionMode = Literal["mixed", "pure"]

FAMILIES = ("gpt2", "llama", "bert")
NORMS = ("layernorm", "rmsnorm", "layernorm_nobias")
MLPS = ("gelu", "swiglu", "geglu")
ACTIVATIONS = ("fused", "gelu_fast", "gelu_new", "gelu_python")
"""How a (Ge)GLU / GELU MLP's GELU runs: one kernel (F.gelu, F.silu), or written out op by op as
transformers' FastGELUActivation / NewGELUActivation / GELUActivation(use_gelu_python=True)."""
BLOCKS = ("sequential", "parallel")
QK_NORMS = ("none", "head", "full", "l2")
MLA_CACHES = ("latent", "expanded")
DROPOUTS = ("attention_dropout", "hidden_dropout", "embedding_dropout")
"""ModelSpec's dropout probabilities (training only; the attention's, each block output's, the embeddings')."""
LAYER_KINDS = ("global", "local")
GATED_MLPS = ("swiglu", "geglu")
POSITIONS = ("learned", "rope")
WORKLOADS = ("train", "inference", "lora", "serve")
OPTIMIZERS = ("adamw", "adam", "sgd", "sgd_momentum", "adamw8bit", "paged_adamw8bit", "adafactor", "lion")
BNB_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "lion")
"""bitsandbytes' optimizers: fused CUDA kernels (`optimizer.impl=fused`)."""
OPTIMIZER_IMPLS = ("foreach", "forloop", "fused")
RECOMPUTES = ("none", "selective", "full", "op")
"""selective: the attention core (Korthikanti et al. 2022); full: every block keeps its input only;
op: per-op selective, torchtitan's `selective_ac_option=op` (each block checkpointed, the outputs of
its fused attention and of every other `aten.mm` kept; measure/models.per_op_sac_context)."""
ATTENTIONS = ("eager", "sdpa")
PRECISIONS = ("mixed", "pure")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# Optimizer state tensors kept per trainable parameter (Adam: m and v; momentum: one buffer; 8-bit
# AdamW: m and v in one byte each; Lion: one momentum; Adafactor: factored, see formulas/techniques.py).
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1, "adamw8bit": 2,
                    "paged_adamw8bit": 2, "adafactor": 0, "lion": 1}
QUANT_METHODS = ("none", "nf4", "fp4", "int8", "gptq", "awq")
"""Weight formats of a frozen base (inference, serving, QLoRA): bitsandbytes' 4-bit NF4 / FP4
(QLoRA) and LLM.int8(), and GPTQ / AWQ int4 checkpoints (formulas/techniques.py)."""
QUANT_DEFAULT_GROUP = {"nf4": 64, "fp4": 64, "gptq": 128, "awq": 128, "int8": 0}
"""Elements per quantization scale: bitsandbytes' 4-bit blocksize 64 (Dettmers et al. 2023, sec. 3;
`bnb_4bit` default), GPTQ / AWQ group_size 128 (the checkpoints people download); LLM.int8() has one
scale per output row (0 here)."""
KV_DTYPES = ("auto", "fp32", "fp16", "bf16", "fp8", "int8")
MIXED_POLICIES = ("autocast", "param_dtype")


MAX_LAYERS = 1 << 16
"""The most layers a model may have (published ones have a few hundred; per-layer lists are built)."""
MAX_INT = (1 << 31) - 1
"""The largest count a key takes (int32's): every size, count and layout of a real job is far
below it, and products of a few such counts stay inside the int64 result columns' range, where
an integer past int64 used to become a null column of an `ok` row."""


def check_int(key: str, value: object, minimum: int = 1, maximum: int = MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(key, value, f"an integer >= {minimum}" + (
            f" and <= {maximum} (2^31 - 1)" if maximum == MAX_INT else f" and <= {maximum}"))


def check_number(key: str, value: object, minimum: float, maximum: float = float("inf"),
                 above_minimum: bool = False, allowed: str | None = None) -> float:
    """A finite real number in [minimum, maximum] ((minimum, maximum] with `above_minimum`), as a float."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and value <= maximum
          and (value > minimum if above_minimum else value >= minimum) and value != float("inf"))
    if not ok:
        bounds = f"{'(' if above_minimum else '['}{minimum:g}, {maximum:g}]"
        raise ConfigError(key, value, allowed or f"a number in {bounds}")
    return float(value)


def check_probability(key: str, value: object) -> float:
    """A dropout probability: a number in [0, 1) (1 would drop everything), as a float."""
    if check_number(key, value, 0.0, 1.0, allowed=PROBABILITY) == 1.0:
        raise ConfigError(key, value, PROBABILITY)
    return float(value)


PROBABILITY = "a probability in [0, 1) (0: no dropout)"


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
    """Norms on queries and keys: per head over head_dim (Qwen3, Gemma-3), over all heads (OLMoE,
    OLMo-2), or l2: per head without a weight (Llama-4's L2 norm; no parameters)."""
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
    router_fp32_logits: bool = False
    """The router's matmul runs in fp32 (DeepSeek-V2/V3's `F.linear(hidden.float(), weight.float())`,
    transformers' DeepseekV2/V3TopkRouter): a 16-bit step saves fp32 copies of its input and weight."""
    # --- attention layout ---------------------------------------------------------------------
    sliding_window: int = 0
    """Window of the local layers in tokens; 0: no local layers."""
    layer_pattern: tuple[str, ...] = ("global",)
    """global / local per layer, repeated over the layers: Mistral-7B-v0.1 (local), Gemma-2 and
    gpt-oss (local, global), Gemma-3 (5 x local, global)."""
    attention_sinks: bool = False
    """gpt-oss: one learned sink logit per head, in every layer's softmax."""
    sdpa_mask: bool = False
    """transformers' Falcon: SDPA is given the model's materialised causal mask (`create_causal_mask(
    allow_is_causal_skip=False)`) and K / V with their own head count, no `enable_gqa`; with fewer
    K/V heads than query heads no fused kernel takes that call (the math kernel runs, on a GPU too)."""
    attn_softcap: float = 0.0
    """Gemma-2: attention scores soft-capped, tanh(scores / cap) * cap (attn_logit_softcapping); 0: none."""
    final_softcap: float = 0.0
    """Gemma-2: the logits soft-capped the same way (final_logit_softcapping); 0: none."""
    q_lora_rank: int = 0
    """Multi-head latent attention (DeepSeek-V2/V3): rank of the query compression; 0: a plain q."""
    kv_lora_rank: int = 0
    """MLA: rank of the joint key-value compression; 0: not MLA."""
    rope_head_dim: int = 0
    """MLA: the rotary part of each query/key head (qk_rope_head_dim); head_dim is nope + rope."""
    v_head_dim: int = 0
    """MLA: per-head size of values; 0 means head_dim."""
    activation: Literal["fused", "gelu_fast", "gelu_new", "gelu_python"] = "fused"
    """A llama-family GELU's implementation: fused (one kernel, saves its input) or one of
    transformers' written-out forms (`hidden_act: gelu_fast` in GPT-NeoX-20B, `gelu_new`,
    `gelu_python`), whose intermediates autograd saves (docs/formulas.md, `gelu_ops_bytes`). GPT-2
    is always gelu_new (its family's path)."""
    attention_dropout: float = 0.0
    """Training: dropout on the attention probabilities (config.json `attention_dropout`, GPT-2's
    `attn_pdrop`, BERT's `attention_probs_dropout_prob`): eager attention keeps the dropped copy
    and a bool mask (b*a*s^2 each); a fused SDPA kernel draws it inside (nothing kept)."""
    hidden_dropout: float = 0.0
    """Training: dropout on each block's attention output and MLP output before the residual add
    (`resid_pdrop`, `residual_dropout`, `hidden_dropout`, BERT's `hidden_dropout_prob`): a bool
    t*h mask per site is kept."""
    embedding_dropout: float = 0.0
    """Training: dropout on the embeddings (`embd_pdrop`, `embedding_dropout`; BERT's
    `hidden_dropout_prob` after its embedding LayerNorm)."""
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
            check_int(f"model.{key}", getattr(self, key), maximum=MAX_LAYERS if key == "layers" else MAX_INT)
        for key in ("type_vocab", "experts", "experts_per_token", "expert_ffn", "shared_experts",
                    "shared_ffn", "dense_layers", "sliding_window", "q_lora_rank", "kv_lora_rank",
                    "rope_head_dim", "v_head_dim"):
            check_int(f"model.{key}", getattr(self, key), minimum=0)
        check_choice("model.norm", self.norm, NORMS)
        check_choice("model.mlp", self.mlp, MLPS)
        check_choice("model.position", self.position, POSITIONS)
        check_choice("model.block", self.block, BLOCKS)
        check_choice("model.qk_norm", self.qk_norm, QK_NORMS)
        if self.family in ("gpt2", "bert") and (self.position, self.mlp, self.norm) != ("learned", "gelu", "layernorm"):
            # the gpt2 / bert code paths are those architectures: another family's preset relabelled
            # (model.family=bert on a llama preset) would be estimated as one thing, named another
            raise ConfigError("model.family", self.family,
                              f"llama for position={self.position}, mlp={self.mlp}, norm={self.norm} "
                              f"({self.family} is learned positions, a GELU MLP and LayerNorm)")
        if self.family == "llama" and self.position != "rope":
            raise ConfigError("model.position", self.position, "rope for model.family=llama")
        check_choice("model.mla_cache", self.mla_cache, MLA_CACHES)
        check_choice("model.activation", self.activation, ACTIVATIONS)
        if self.activation != "fused" and (self.family != "llama" or self.mlp == "swiglu"):
            raise ConfigError("model.activation", self.activation,
                              "fused unless model.family=llama with mlp=gelu or geglu (a written-out GELU)")
        for key in ("qkv_bias", "out_bias", "mlp_bias", "tied_embeddings", "pooler",
                    "shared_expert_gate", "router_bias", "router_fp32_logits", "attention_sinks", "sdpa_mask"):
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
        for key in ("attn_softcap", "final_softcap"):
            check_number(f"model.{key}", getattr(self, key), 0.0, allowed="a number >= 0 (0: no soft-capping)")
        check_number("model.rotary_fraction", self.rotary_fraction, 0.0, 1.0, above_minimum=True)
        for key in DROPOUTS:
            check_probability(f"model.{key}", getattr(self, key))
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
            for key in ("shared_expert_gate", "router_bias", "router_fp32_logits"):
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
    def dropout(self) -> bool:
        """Any dropout in training (the model's config; `Workload.lora_dropout` is the adapters')."""
        return any(getattr(self, key) > 0 for key in DROPOUTS)

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


KBIT_QUANT = ("nf4", "fp4", "int8")
"""The bases peft's prepare_model_for_kbit_training casts around (bitsandbytes'; it leaves GPTQ's
parameters as they are, peft/utils/other.py)."""


@dataclass(frozen=True)
class Workload:
    """What one job runs: a training step, LoRA fine-tuning step, prefill + decode inference, or a
    serving engine (`serve`: paged KV cache, chunked prefill, as vLLM runs)."""

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
    lora_dropout: float = 0.0
    """peft's `LoraConfig.lora_dropout` (0 by default; 0.05 or 0.1 in most recipes): each adapter
    drops its input (a copy and a bool mask kept per adapted matrix, in training)."""
    quant: str = "none"
    """The frozen weights' format (inference, serve, and LoRA's base: QLoRA): none (the dtype),
    nf4 / fp4 (bitsandbytes 4-bit), int8 (LLM.int8()), gptq / awq (int4 checkpoints). Block
    matrices only; embeddings, lm_head, norms and routers stay 16-bit (formulas/techniques.py)."""
    quant_group: int = 0
    """Elements per scale; 0: the method's default (nf4/fp4 64, gptq/awq 128)."""
    double_quant: bool = True
    """nf4 / fp4: quantize the block scales too (QLoRA's double quantization)."""
    kbit_prepare: bool = False
    """LoRA on a k-bit base: peft's `prepare_model_for_kbit_training` ran. On a bitsandbytes base
    (quant nf4 / fp4 / int8) it casts every 16-bit parameter that is not quantized (embeddings, LM
    head, norms, biases, routers) to fp32, so the forward carries fp32 hidden states, which
    bitsandbytes' layers cast to their compute dtype and their outputs back (`kbit` in
    formulas/detailed.py); on a GPTQ base it casts nothing."""
    prefill_logits: str = "last"
    """Inference prefill: last (the last position's logits, transformers >= 4.45 `logits_to_keep`)
    or all (the whole prompt's, upcast to fp32: older transformers and some servers)."""
    # --- serve only (vLLM's engine arguments) -----------------------------------------------------
    block_size: int = 0
    """serve: tokens per KV-cache block (vLLM default 16)."""
    gpu_util: float = 0.0
    """serve: fraction of the GPU's memory the engine may use (vLLM `gpu_memory_utilization`, 0.9)."""
    max_batched_tokens: int = 0
    """serve: tokens per engine step, the chunked prefill's size (vLLM `max_num_batched_tokens`)."""
    max_seqs: int = 0
    """serve: sequences per engine step (vLLM `max_num_seqs`): the sampler's logits are this many rows."""
    graph_mib: int = 0
    """serve: CUDA graphs and workspaces beyond the activation peak, MiB (formulas/techniques.py)."""

    def __post_init__(self) -> None:
        check_label("workload.name", self.name)
        check_choice("workload.kind", self.kind, WORKLOADS)
        check_int("workload.gen_tokens", self.gen_tokens, minimum=0)
        check_bool("workload.use_cache", self.use_cache)
        check_choice("workload.quant", self.quant, QUANT_METHODS)
        check_int("workload.quant_group", self.quant_group, minimum=0)
        check_bool("workload.double_quant", self.double_quant)
        check_bool("workload.kbit_prepare", self.kbit_prepare)
        if self.kbit_prepare and (self.kind != "lora" or self.quant not in (*KBIT_QUANT, "gptq")):
            raise ConfigError("workload.kbit_prepare", self.kbit_prepare,
                              f"false unless workload kind lora on a k-bit base (quant {', '.join(KBIT_QUANT)}, "
                              f"or gptq, whose parameters peft leaves as they are); here kind {self.kind}, quant {self.quant}")
        check_choice("workload.prefill_logits", self.prefill_logits, ("last", "all"))
        if self.kind in ("inference", "serve") and not self.use_cache:
            raise ConfigError("workload.use_cache", self.use_cache,
                              f"true for workload kind {self.kind} (decoding reads the cache)")
        # a value the workload would ignore is refused: the row would not be what the user asked
        if self.kind != "inference" and self.gen_tokens:
            raise ConfigError("workload.gen_tokens", self.gen_tokens, f"0 for workload kind {self.kind} (inference only)")
        if self.kind != "inference" and self.prefill_logits != "last":
            raise ConfigError("workload.prefill_logits", self.prefill_logits,
                              f"last for workload kind {self.kind} (an inference prefill's choice)")
        if self.kind == "train" and self.quant != "none":
            raise ConfigError("workload.quant", self.quant,
                              "none for workload kind train (quantized weights are frozen: lora for QLoRA, "
                              "inference or serve)")
        if self.quant == "none" and self.quant_group:
            raise ConfigError("workload.quant_group", self.quant_group, "0 without workload.quant")
        if self.quant == "int8" and self.quant_group:
            raise ConfigError("workload.quant_group", self.quant_group,
                              "0 for workload.quant=int8 (LLM.int8() keeps one scale per output row)")
        self._check_serve()
        if self.kind != "lora":
            if self.lora_rank != 0:
                raise ConfigError("workload.lora_rank", self.lora_rank,
                                  f"0 for workload kind {self.kind} (adapters belong to a lora workload: workload=lora)")
            if self.lora_targets:
                raise ConfigError("workload.lora_targets", list(self.lora_targets),
                                  f"[] for workload kind {self.kind} (adapters belong to a lora workload: workload=lora)")
        check_probability("workload.lora_dropout", self.lora_dropout)
        if self.kind != "lora" and self.lora_dropout:
            raise ConfigError("workload.lora_dropout", self.lora_dropout,
                              f"0 for workload kind {self.kind} (adapters belong to a lora workload: workload=lora)")
        if self.kind == "lora":
            check_int("workload.lora_rank", self.lora_rank)
            if not self.lora_targets:
                raise ConfigError("workload.lora_targets", list(self.lora_targets), LORA_TARGETS)
            for target in self.lora_targets:
                check_choice("workload.lora_targets", target, LORA_TARGETS)
            if len(set(self.lora_targets)) != len(self.lora_targets):
                raise ConfigError("workload.lora_targets", list(self.lora_targets), "distinct names")

    def _check_serve(self) -> None:
        serve = ("block_size", "max_batched_tokens", "max_seqs")
        if self.kind != "serve":
            for key in (*serve, "gpu_util", "graph_mib"):
                if getattr(self, key):
                    raise ConfigError(f"workload.{key}", getattr(self, key),
                                      f"0 for workload kind {self.kind} (a serving engine's setting: workload=serve)")
            return
        for key in serve:
            check_int(f"workload.{key}", getattr(self, key))
        check_int("workload.graph_mib", self.graph_mib, minimum=0)
        u = self.gpu_util
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ConfigError("workload.gpu_util", u, "a fraction in (0, 1] (vLLM's gpu_memory_utilization)")

    @property
    def training(self) -> bool:
        return self.kind in ("train", "lora")

    @property
    def group_size(self) -> int:
        """Elements per quantization scale (the method's default when `quant_group` is 0)."""
        return self.quant_group or QUANT_DEFAULT_GROUP.get(self.quant, 0)


@dataclass(frozen=True)
class OffloadSpec:
    """What leaves the GPU for CPU RAM (the `cpu_bytes` column says how much lands there)."""

    optimizer: bool = False
    """ZeRO-Offload (DeepSpeed `offload_optimizer`), FSDP `CPUOffload`: optimizer states, the fp32
    master weights and the gradients live in CPU RAM, and the step runs there."""
    params: bool = False
    """DeepSpeed ZeRO-3 `offload_param`, FSDP `offload_params`: the 16-bit parameters too; a layer's
    are brought to the GPU while it runs (needs offload.optimizer, as both libraries do)."""
    activations: bool = False
    """torchtune's activation offloading: the checkpoints move to pinned CPU memory as the forward
    makes them and come back for the backward (needs recompute=full, as torchtune does)."""

    def __post_init__(self) -> None:
        for key in ("optimizer", "params", "activations"):
            check_bool(f"offload.{key}", getattr(self, key))
        if self.params and not self.optimizer:
            raise ConfigError("offload.params", True, "false without offload.optimizer (ZeRO-3 and FSDP offload the "
                                                      "optimizer with the parameters)")

    @property
    def any(self) -> bool:
        return self.optimizer or self.params or self.activations


@dataclass(frozen=True)
class LossSpec:
    """How a training step computes its cross-entropy (the largest single tensors of a step)."""

    chunks: int = 1
    """1: one cross_entropy on the whole (t, V) logits, upcast to fp32. N > 1: torchtune's
    CEWithChunkedOutputLoss: the LM head runs on N sequence chunks and each chunk's logits are
    upcast and reduced on their own (`num_output_chunks`, 8 in torchtune's recipes)."""
    fused: bool = False
    """Liger-Kernel's fused linear cross-entropy: the head and the loss run chunk by chunk inside
    one function that computes the gradients in the forward; the (t, V) logits never exist."""

    def __post_init__(self) -> None:
        check_int("loss.chunks", self.chunks)
        check_bool("loss.fused", self.fused)
        if self.fused and self.chunks != 1:
            raise ConfigError("loss.chunks", self.chunks, "1 with loss.fused=true (the fused kernel picks its own chunks)")

    @property
    def default(self) -> bool:
        return self.chunks == 1 and not self.fused


KERNEL_CHOICES = ("eager", "fused")
LOSS_KERNELS = ("eager", "fused", "fused_linear")


@dataclass(frozen=True)
class KernelsSpec:
    """Which kernels a training step runs (issue 30): PyTorch's / transformers' ops one by one
    (eager), or the fused kernels the stacks that train at scale use. Each choice changes what the
    step keeps for its backward; docs/kernels.md says what each kernel saves, from its source."""

    name: str = "eager"
    norm: str = "eager"
    """fused: one RMSNorm / LayerNorm kernel (Liger's, flash-attn's, Apex's, Transformer Engine's)
    that saves its input in its own dtype and fp32 statistics per row (rstd; and the mean for a
    LayerNorm), where the eager norm keeps fp32 copies of the row."""
    mlp: str = "eager"
    """fused: the activation (and a gated MLP's product) is one kernel that saves its inputs and
    recomputes its output in the backward (Liger's SiLUMul / GELUMul, flash-attn's swiglu): a gated
    MLP keeps gate(x) and up(x), not act(gate(x)) too; a GELU is one kernel, not op by op."""
    rope: str = "eager"
    """fused: the rotary embedding rotates q and k in place (Liger's, flash-attn's): no rotated
    copies or temporaries in the forward, cos and sin saved."""
    loss: str = "eager"
    """fused: one cross-entropy kernel on the 16-bit logits (flash-attn's, Liger's, llm.c's): no fp32
    copy or log-softmax, an fp32 log-sum-exp per row, the gradient written into the logits' storage.
    fused_linear: Liger's fused linear cross-entropy (the head and the loss chunk by chunk; the
    logits never exist), the same as loss.fused=true."""
    compile: bool = False
    """torch.compile of every block (and of an eager loss), as torchtitan, torchtune and OLMo-core
    compile: AOTAutograd's min-cut partitioner picks what each block saves and recomputes
    (measure/compiled.py traces it); Inductor's fusion keeps pointwise intermediates in registers."""
    compile_loss: bool = True
    """With compile: the eager cross-entropy compiled too, as torchtune's `compile_loss` does
    (true); false: the blocks alone, as torchtitan's `apply_compile` (2024) compiled each
    TransformerBlock and left its `cross_entropy(pred.float(), labels)` eager."""

    def __post_init__(self) -> None:
        check_label("kernels.name", self.name)
        for key in ("norm", "mlp", "rope"):
            check_choice(f"kernels.{key}", getattr(self, key), KERNEL_CHOICES)
        check_choice("kernels.loss", self.loss, LOSS_KERNELS)
        check_bool("kernels.compile", self.compile)
        check_bool("kernels.compile_loss", self.compile_loss)

    @property
    def default(self) -> bool:
        return (self.norm, self.mlp, self.rope, self.loss, self.compile) == ("eager",) * 4 + (False,)

    @property
    def label(self) -> str:
        """What a result row's `kernels` column says: eager, or the fused ops "+"-joined."""
        parts = [k if k != "loss" else f"loss={self.loss}"
                 for k in ("norm", "mlp", "rope", "loss") if getattr(self, k) != "eager"] + (
            (["compile"] if self.compile_loss else ["compile(blocks)"]) if self.compile else [])
        return "+".join(parts) or "eager"

    @property
    def used(self) -> tuple[str, ...]:
        """The non-eager choices, as `kernels.KEY=VALUE` words (for a row's `techniques`)."""
        return (tuple(f"kernels.{k}={getattr(self, k)}" for k in ("norm", "mlp", "rope", "loss") if getattr(self, k) != "eager")
                + (("kernels.compile=true",) if self.compile else ())
                + (("kernels.compile_loss=false",) if self.compile and not self.compile_loss else ()))


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimizer used by training workloads; `impl` mirrors PyTorch's foreach/for-loop/fused choice."""

    name: OptimizerName
    impl: Literal["foreach", "forloop", "fused"] = "foreach"
    in_backward: bool = False
    """Step each parameter inside the backward, as its gradient lands, and free that gradient
    (torchtune's `optimizer_in_bwd`): no full set of gradients ever exists."""
    first_moment: bool = False
    """adafactor only: keep a first moment (Hugging Face's `beta1`; None by default, as here)."""

    def __post_init__(self) -> None:
        check_choice("optimizer.name", self.name, OPTIMIZERS)
        check_choice("optimizer.impl", self.impl, OPTIMIZER_IMPLS)
        check_bool("optimizer.in_backward", self.in_backward)
        check_bool("optimizer.first_moment", self.first_moment)
        if self.name in BNB_OPTIMIZERS and self.impl != "fused":
            raise ConfigError("optimizer.impl", self.impl, f"fused for optimizer {self.name} (bitsandbytes' kernels)")
        if self.name == "adafactor" and self.impl != "forloop":
            raise ConfigError("optimizer.impl", self.impl,
                              "forloop for optimizer adafactor (transformers' Adafactor steps one parameter at a time)")
        if self.first_moment and self.name != "adafactor":
            raise ConfigError("optimizer.first_moment", True, f"false for optimizer {self.name} (adafactor's beta1)")

    @property
    def states_per_param(self) -> int:
        return OPTIMIZER_STATES[self.name]


PARALLEL_STACKS = ("fsdp", "deepspeed")


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
    stack: str = "fsdp"
    """Whose parallelism: `fsdp`, torch's own (DDP, + ZeroRedundancyOptimizer at ZeRO-1, FSDP2 from
    ZeRO-2 on: every parameter sharded at rest, all-gathered per block; DTensor's tensor
    parallel); `deepspeed`: DeepSpeed's ZeRO (16-bit replicas of the weights below stage 3) and
    Megatron's tensor parallel."""

    def __post_init__(self) -> None:
        check_label("parallel.name", self.name)
        for key in ("tp", "pp", "dp", "ep"):
            check_int(f"parallel.{key}", getattr(self, key))
        if self.dp % self.ep:
            raise ConfigError("parallel.ep", self.ep, f"a divisor of parallel.dp={self.dp} (experts are split over data-parallel ranks)")
        if self.zero not in (0, 1, 2, 3) or isinstance(self.zero, bool):
            raise ConfigError("parallel.zero", self.zero, "0, 1, 2, 3")
        check_bool("parallel.sequence_parallel", self.sequence_parallel)
        check_choice("parallel.stack", self.stack, PARALLEL_STACKS)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class Hardware:
    """One accelerator: its total memory (as nvidia-smi reports it) and what the CUDA context,
    driver and library workspaces keep for themselves, both in MiB; and its peak speeds
    (docs/hardware.md, each preset citing its datasheet). A speed of 0 means unknown, so a
    preset that gives only its memory still loads."""

    name: str
    memory_mib: int
    reserved_mib: int = 512
    tflops_fp32: float = 0.0
    """Peak FP32 on the CUDA cores (non-tensor, what a float32 matmul runs at with TF32 off,
    PyTorch's default), TFLOP/s."""
    tflops_tf32: float = 0.0
    """Peak dense TF32 tensor-core throughput, TFLOP/s (not the 2:4 structured-sparsity figure)."""
    tflops_bf16: float = 0.0
    """Peak dense BF16 tensor-core throughput with FP32 accumulate, TFLOP/s."""
    tflops_fp16: float = 0.0
    """Peak dense FP16 tensor-core throughput with FP32 accumulate (what PyTorch's fp16 matmuls
    use; GeForce cards run FP16 accumulate twice as fast), TFLOP/s."""
    tflops_fp8: float = 0.0
    """Peak dense FP8 tensor-core throughput with FP32 accumulate, TFLOP/s; 0 without FP8 units."""
    tops_int8: float = 0.0
    """Peak dense INT8 tensor-core throughput, TOP/s."""
    hbm_gbs: float = 0.0
    """Device memory bandwidth as the datasheet gives it, GB/s (1e9 bytes/s)."""
    nvlink_gbs: float = 0.0
    """NVLink bandwidth per GPU per direction, GB/s (NVIDIA quotes both directions together:
    half of that); 0 without NVLink."""
    pcie_gbs: float = 0.0
    """Host link per direction, GB/s: PCIe Gen4 x16 about 32, Gen5 x16 about 64."""
    network_gbs: float = 0.0
    """Inter-node network per GPU per direction, GB/s, of the usual cluster for this GPU (DGX:
    one 200 or 400 Gb/s NIC per GPU)."""
    gpus_per_node: int = 8
    """GPUs in one node: a collective among at most this many runs over NVLink (PCIe when
    nvlink_gbs is 0), a larger one over the network."""
    compute_capability: str = "8.0"
    """CUDA compute capability ("major.minor": A100 8.0, RTX 30xx 8.6, RTX 4090 8.9, H100 / H200
    9.0): which SDPA kernel PyTorch picks on this GPU (`measure/sdpa.py`, and `detailed`)."""

    def __post_init__(self) -> None:
        check_label("hardware.name", self.name)
        cc = str(self.compute_capability)
        major, dot, minor = cc.partition(".")
        if not (major.isdigit() and dot and minor.isdigit() and 5 <= int(major) <= 12):
            raise ConfigError("hardware.compute_capability", self.compute_capability,
                              'a CUDA compute capability "major.minor", 5.0 to 12.1 (H100: "9.0")')
        object.__setattr__(self, "compute_capability", f"{int(major)}.{int(minor)}")
        check_int("hardware.memory_mib", self.memory_mib)
        check_int("hardware.reserved_mib", self.reserved_mib, minimum=0)
        if self.reserved_mib >= self.memory_mib:
            raise ConfigError("hardware.reserved_mib", self.reserved_mib,
                              f"less than hardware.memory_mib={self.memory_mib}")
        for key in ("tflops_fp32", "tflops_tf32", "tflops_bf16", "tflops_fp16", "tflops_fp8",
                    "tops_int8", "hbm_gbs", "nvlink_gbs", "pcie_gbs", "network_gbs"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise ConfigError(f"hardware.{key}", v, "a number >= 0 (0 = unknown)")
            object.__setattr__(self, key, float(v))  # a YAML integer (312) reads as 312.0
        check_int("hardware.gpus_per_node", self.gpus_per_node)

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def capability(self) -> tuple[int, int]:
        """`compute_capability` as (major, minor): (9, 0) for an H100."""
        major, _, minor = self.compute_capability.partition(".")
        return int(major), int(minor)

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
    impl: Literal["reference", "hf", "torchtune"] = "reference"
    """What runs: memsweep's reference models, the Hugging Face transformers model (issue 12), or
    torchtune's single-device training recipe with its own modules (measure/torchtune.py)."""
    sdpa: Literal["gpu", "device"] = "gpu"
    """fake only: the SDPA kernel CUDA picks on the job's GPU (`hardware.compute_capability`,
    measure/sdpa.py), or the measuring device's own (the CPU's: what makes fake equal cpu byte
    for byte). cpu and cuda always run their device's pick."""

    def __post_init__(self) -> None:
        check_label("measure.name", self.name)
        check_choice("measure.backend", self.backend, MEASURE_BACKENDS)
        check_choice("measure.sdpa", self.sdpa, ("gpu", "device"))
        check_choice("measure.impl", self.impl, ("reference", "hf", "torchtune"))
        check_bool("measure.isolate", self.isolate)
        for key in ("timeout_s", "max_rss_gib"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise ConfigError(f"measure.{key}", v, "null or a number > 0")
        check_int("measure.warmup", self.warmup, minimum=1)
        check_int("measure.repeats", self.repeats)
        check_int("measure.seed", self.seed, minimum=0, maximum=(1 << 63) - 1)
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
    loss: LossSpec = field(default_factory=LossSpec)
    offload: OffloadSpec = field(default_factory=OffloadSpec)
    kernels: KernelsSpec = field(default_factory=KernelsSpec)
    grad_accum: int = 1
    """Micro-batches per optimizer step: their gradients accumulate in place, so from the second
    micro-batch on the whole gradient set is alive through its forward and backward."""
    mixed_policy: str = "autocast"
    """How mixed precision runs: autocast (PyTorch AMP: fp32 parameters, each layer's 16-bit cast
    saved for its backward) or param_dtype (FSDP2's MixedPrecisionPolicy, DeepSpeed bf16: a layer
    computes with 16-bit parameters, the fp32 copy lives with the optimizer; activations as a
    pure 16-bit model's)."""
    kv_dtype: str = "auto"
    """KV cache element type in inference and serving: auto (the compute dtype), or fp8 / int8
    (one byte, as vLLM's `kv_cache_dtype=fp8`), or a float dtype."""
    margin: float = 0.05
    """Share of the usable memory (memory less the reserve) kept free: a job fits when its total is
    at most (memory - reserve) x (1 - margin) (`memsweep.capacity`, the planner's too)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "margin", check_margin(self.margin))
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
        self._check_techniques()
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
        if p.pp > m.layers:  # (an uneven split: columns.stage_layers)
            raise ConfigError("parallel.pp", p.pp, f"at most model.layers={m.layers} stages")
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

    def _check_techniques(self) -> None:
        """The technique keys (issue 13) where they apply, and only there."""
        w, m = self.workload, self.model
        check_choice("kv_dtype", self.kv_dtype, KV_DTYPES)
        check_int("grad_accum", self.grad_accum)
        check_choice("mixed_policy", self.mixed_policy, MIXED_POLICIES)
        if not isinstance(self.offload, OffloadSpec):
            raise ConfigError("offload", self.offload, "a mapping of optimizer, params, activations")
        if not w.training:
            for key, value in (("grad_accum", self.grad_accum != 1), ("mixed_policy", self.mixed_policy != "autocast"),
                               ("offload.optimizer", self.offload.optimizer), ("offload.params", self.offload.params),
                               ("offload.activations", self.offload.activations)):
                if value:
                    raise ConfigError(key, getattr(self, key, True) if "." not in key else True,
                                      f"the default for workload kind {w.kind} (a training setting)")
        if self.grad_accum > 1 and self.optimizer.in_backward:
            raise ConfigError("grad_accum", self.grad_accum,
                              "1 with optimizer.in_backward=true (the step needs the whole batch's gradient; torchtune refuses it too)")
        if self.offload.activations and self.recompute != "full":
            raise ConfigError("offload.activations", True, f"false with recompute={self.recompute} "
                                                           "(torchtune offloads the checkpoints of recompute=full)")
        if self.offload.optimizer and self.optimizer.in_backward:
            raise ConfigError("offload.optimizer", True, "false with optimizer.in_backward=true (the step runs on the CPU)")
        if not isinstance(self.loss, LossSpec):
            raise ConfigError("loss", self.loss, "a mapping of chunks, fused")
        if not w.training and not self.loss.default:
            key, value = ("loss.fused", True) if self.loss.fused else ("loss.chunks", self.loss.chunks)
            raise ConfigError(key, value, f"the default for workload kind {w.kind} (a training loss)")
        if not isinstance(self.kernels, KernelsSpec):
            raise ConfigError("kernels", self.kernels, "a kernels preset (eager, liger, flash_attn, te) or a mapping of norm, mlp, rope, loss")
        if not w.training and not self.kernels.default:
            key = self.kernels.used[0].split("=")[0]
            raise ConfigError(key, getattr(self.kernels, key.split(".")[1]),
                              f"eager for workload kind {w.kind} (kernels=eager: the fused kernels are modelled for a training step)")
        if self.loss.fused and self.kernels.loss not in ("eager", "fused_linear"):
            raise ConfigError("kernels.loss", self.kernels.loss, "eager or fused_linear with loss.fused=true (Liger's fused linear cross-entropy)")
        if self.kernels.compile and m.experts:
            raise ConfigError("kernels.compile", True, f"false for {m.name} (routed experts: torch.compile's graphs of "
                                                       "data-dependent token counts are not modelled)")
        if self.kernels.loss != "eager" and self.loss.chunks != 1:
            raise ConfigError("loss.chunks", self.loss.chunks, f"1 with kernels.loss={self.kernels.loss} (a fused loss is one kernel)")
        if w.training and self.kv_dtype != "auto":
            raise ConfigError("kv_dtype", self.kv_dtype, f"auto for workload kind {w.kind} (an inference cache's type)")
        if self.dtype in ("int8", "int4") and w.quant != "none":
            raise ConfigError("dtype", self.dtype, f"fp16, bf16 or fp32 (the compute dtype) with workload.quant={w.quant}")
        if self.optimizer.in_backward and w.training and self.parallel.zero >= 2:
            raise ConfigError("optimizer.in_backward", True,
                              f"false with parallel.zero={self.parallel.zero} (ZeRO reduces gradients across ranks first)")
        if w.kind == "serve":
            if not m.decoder:
                raise ConfigError("workload.kind", w.kind, f"train, lora or inference for {m.name} (an encoder serves no tokens)")
            if self.measure.backend != "none":
                raise ConfigError("measure.backend", self.measure.backend,
                                  "none for workload kind serve (a serving engine is estimated, not measured, here)")
            if w.max_batched_tokens < w.max_seqs:
                raise ConfigError("workload.max_batched_tokens", w.max_batched_tokens,
                                  f"at least workload.max_seqs={w.max_seqs} (vLLM's rule)")

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
                 "hardware": Hardware, "measure": MeasureSpec, "loss": LossSpec, "offload": OffloadSpec,
                 "kernels": KernelsSpec}
        # rows from before issue 13 (loss, offload) and issue 30 (kernels)
        d = {**d, "loss": d.get("loss", {}), "offload": d.get("offload", {}), "kernels": d.get("kernels", {})}
        w = dict(d["workload"], lora_targets=tuple(d["workload"].get("lora_targets", ())))
        d = dict(d, model=model_fields(d["model"]))
        rest = {k: v for k, v in d.items() if k not in (*parts, "workload")}
        rest["formulas"] = tuple(rest.get("formulas", ()))
        rest["formula_constants"] = tuple((k, float(v)) for k, v in rest.get("formula_constants", ()))
        return cls(workload=Workload(**w), **{k: t(**d[k]) for k, t in parts.items()}, **rest)

    @property
    def loss_kernel(self) -> str:
        """The training loss's kernel: eager, fused, or fused_linear (Liger's; `loss.fused=true` too)."""
        return "fused_linear" if self.loss.fused else self.kernels.loss

    @property
    def effective_kernels(self) -> KernelsSpec:
        """`kernels` with `loss.fused=true` folded in (kernels.loss=fused_linear)."""
        return replace(self.kernels, loss=self.loss_kernel)

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

    @property
    def quant(self) -> str:
        """The frozen weights' format: `workload.quant`, or the legacy `dtype=int8` (LLM.int8()) /
        `dtype=int4` (awq's layout, group 128) of an inference job."""
        if self.dtype == "int8":
            return "int8"
        if self.dtype == "int4":
            return "awq"
        return self.workload.quant

    @property
    def kbit(self) -> bool:
        """peft's prepare_model_for_kbit_training has cast a 16-bit bitsandbytes base's other
        parameters to fp32 (`workload.kbit_prepare`; GPTQ's are left as they are, an fp32 model's
        already are)."""
        w = self.workload
        return w.kind == "lora" and w.kbit_prepare and self.quant in KBIT_QUANT and self.dtype_bytes == 2

    @property
    def quant_group(self) -> int:
        """Elements per quantization scale of `quant` (its default unless workload.quant_group)."""
        return self.workload.quant_group or QUANT_DEFAULT_GROUP.get(self.quant, 0)

    @property
    def kv_bytes(self) -> float:
        """Bytes per KV-cache element: the compute dtype's (16-bit for quantized weights), or kv_dtype's."""
        if self.kv_dtype == "auto":
            return max(self.dtype_bytes, 2.0)
        return 1.0 if self.kv_dtype in ("fp8", "int8") else DTYPE_BYTES[self.kv_dtype]
