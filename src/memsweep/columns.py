"""Numeric columns: the form every estimator evaluates.

A `Columns` holds one float64 numpy array per quantity (architecture numbers, workload, precision,
parallel layout), all of one length. One job is a length-1 `Columns`; capacity planning builds a
million-row one straight from numpy arrays. Categorical choices become 0/1 flags or small counts,
so formulas are plain arithmetic with `np.where`, with no per-row Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from memsweep.specs import ACTIVATIONS, GATED_MLPS, QK_NORMS, JobSpec, ModelSpec

Array = np.ndarray
FAMILY_CODES = {"gpt2": 0, "llama": 1, "bert": 2}


@dataclass(frozen=True)
class Columns:
    # architecture
    family: Array  # 0 gpt2 (pre-LN decoder), 1 llama (pre-RMSNorm decoder), 2 bert (post-LN encoder)
    layers: Array
    hidden: Array
    heads: Array
    kv_heads: Array
    head_dim: Array  # query / key head size
    ffn: Array
    vocab: Array
    max_positions: Array
    learned_positions: Array  # 1: a learned position table (gpt2, bert); 0: rope
    type_vocab: Array  # bert token-type table rows
    embedding_norm: Array  # 1: a norm after the embeddings (bert)
    final_norm: Array  # 1: a norm before the LM head (gpt2, llama)
    norm_bias: Array  # 1: LayerNorm (weight + bias); 0: RMSNorm or a bias-free LayerNorm (weight only)
    gated_mlp: Array  # 1: SwiGLU / GeGLU (gate, up, down); 0: GELU (up, down)
    qkv_bias: Array
    out_bias: Array
    mlp_bias: Array
    tied_embeddings: Array
    pooler: Array
    v_head_dim: Array  # value head size (head_dim but in MLA)
    parallel_block: Array  # 1: attention and MLP read the same input (GPT-NeoX, Falcon, Cohere)
    block_norms: Array  # norms per block: 1, 2 or 4
    qk_norm: Array  # 0 none, 1 per head (head_dim weights each), 2 over all heads, 3 l2 (no weights)
    attention_sinks: Array  # 1: a learned sink logit per head and layer (gpt-oss)
    sdpa_mask: Array  # 1: SDPA gets a materialised causal mask and unshared K/V heads (transformers' Falcon)
    attn_softcap: Array  # 1: eager attention scores soft-capped, tanh(x / cap) * cap (Gemma-2)
    final_softcap: Array  # 1: the logits soft-capped the same way (Gemma-2)
    local_layers: Array  # layers with sliding-window attention
    window: Array  # their window, tokens
    mla: Array  # 1: multi-head latent attention (DeepSeek-V2/V3)
    q_lora_rank: Array
    kv_lora_rank: Array
    rope_head_dim: Array  # MLA: rotary part of each query / key head
    mla_latent_cache: Array  # MLA inference: 1 caches the latent, 0 the expanded K and V
    experts: Array  # routed experts per MoE layer (0: dense)
    experts_per_token: Array
    expert_ffn: Array  # one routed expert's hidden size
    shared_ffn: Array  # all shared experts' hidden size together (0: none)
    shared_expert_gate: Array
    moe_layers: Array
    router_bias: Array
    router_fp32_logits: Array  # DeepSeek: the router's matmul in fp32
    rope_dim: Array  # dimensions of each query / key head that RoPE rotates (0: learned positions)
    layer_norm: Array  # 1: LayerNorm (with or without bias) rather than RMSNorm
    geglu: Array  # 1: the gated MLP's activation is tanh-GELU (Gemma) rather than SiLU
    gelu_ops: Array  # 0 fused GELU; 1 gelu_fast, 2 gelu_new, 3 gelu_python written out op by op
    attn_dropout: Array  # training: the attention probabilities' dropout p (SDPA's kernel choice reads p)
    hidden_dropout: Array  # training: dropout p on each block's attention and MLP outputs
    embedding_dropout: Array  # training: dropout p on the embeddings
    # workload
    batch: Array
    seq: Array
    gen_tokens: Array
    training: Array  # 1 for train and lora
    lora: Array
    lora_rank: Array
    train_cache: Array
    lora_q: Array
    lora_k: Array
    lora_v: Array
    lora_o: Array
    lora_gate: Array
    lora_up: Array
    lora_down: Array
    lora_dropout: Array  # peft's lora_dropout p (each adapter drops its input)
    # precision
    dtype_bytes: Array
    mixed: Array
    # optimizer
    optimizer_states: Array  # state tensors per trainable parameter: adam 2, momentum 1, sgd 0
    foreach: Array
    # techniques (issue 13; formulas/techniques.py)
    opt_8bit: Array  # bitsandbytes' block-wise 8-bit states (adamw8bit, paged_adamw8bit)
    opt_lion: Array  # Lion: one fp32 momentum (bitsandbytes' 32-bit kernel)
    opt_adafactor: Array  # factored second moments (transformers' Adafactor)
    opt_first_moment: Array  # adafactor with beta1
    in_backward: Array  # step each parameter in the backward (no gradient set)
    loss_chunks: Array  # torchtune's chunked output + loss (1: one cross_entropy)
    fused_loss: Array  # Liger's fused linear cross-entropy (loss.fused, kernels.loss=fused_linear)
    fused_ce: Array  # one cross-entropy kernel on the 16-bit logits (kernels.loss=fused)
    fused_norm: Array  # kernels.norm=fused: the norm saves its input and fp32 statistics per row
    fused_mlp: Array  # kernels.mlp=fused: the activation recomputed in the backward
    fused_rope: Array  # kernels.rope=fused: the rotary embedding in place
    compiled: Array  # kernels.compile: each block (and an eager loss) as AOTAutograd's partitioned graphs
    compiled_loss: Array  # kernels.compile with kernels.compile_loss: the eager loss compiled too
    q_bits: Array  # bits per element of the frozen block matrices (0: not quantized)
    q_group: Array  # elements per quantization group (0: none)
    q_group_bytes: Array  # bytes per group: scales (+ zero points)
    q_in_bytes: Array  # bytes per input row of each matrix (GPTQ's g_idx)
    q_out_bytes: Array  # bytes per output row (LLM.int8()'s fp32 row scale)
    kv_bytes: Array  # KV cache bytes per element (0: the compute dtype)
    prefill_all_logits: Array  # inference prefill keeps every position's logits, fp32
    offload_optimizer: Array  # optimizer states, fp32 master and gradients in CPU RAM
    offload_params: Array  # the 16-bit parameters too, gathered per layer
    offload_activations: Array  # checkpoints in pinned CPU memory
    grad_accum: Array  # micro-batches per optimizer step
    param_policy: Array  # mixed precision computes with 16-bit parameters (FSDP2 / DeepSpeed), no autocast
    kbit: Array  # peft's prepare_model_for_kbit_training: a bitsandbytes base's other parameters fp32
    serve: Array  # a serving engine (vLLM): paged KV cache in what the rest leaves
    block_size: Array
    gpu_util: Array
    max_batched_tokens: Array
    max_seqs: Array
    graph_bytes: Array
    # activation memory choices
    recompute_selective: Array
    recompute_full: Array
    recompute_op: Array
    """Per-op selective (recompute=op): recompute_full is 1 too, and each block keeps its SAC cache
    (formulas/sac.py)."""
    eager_attention: Array
    sm: Array  # the GPU's CUDA compute capability x 10 (80: A100, 90: H100); 0: unknown (read as 80)
    # parallel layout
    tp: Array
    pp: Array
    dp: Array
    zero: Array
    deepspeed: Array  # parallel.stack=deepspeed (1): ZeRO's 16-bit replicas; 0: torch's FSDP2
    sequence_parallel: Array
    ep: Array

    def __post_init__(self) -> None:
        n = {np.shape(getattr(self, f.name)) for f in fields(self)}
        if len(n) != 1:
            raise ValueError(f"Columns need arrays of one shape, got {sorted(n)}")

    def __len__(self) -> int:
        return int(np.size(self.layers))

    def take(self, rows: np.ndarray) -> Columns:
        """The rows selected by a boolean mask or an index array."""
        return Columns(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @classmethod
    def from_arrays(cls, **arrays: object) -> Columns:
        """Build from scalars and arrays broadcast to one length. Omitted columns are 0, except
        tp, pp, dp, ep (1), block_norms (2) and v_head_dim (head_dim): callers that evaluate real
        configurations pass every column."""
        unknown = set(arrays) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown columns: {sorted(unknown)}")
        defaults = {"tp": 1.0, "pp": 1.0, "dp": 1.0, "ep": 1.0, "block_norms": 2.0, "loss_chunks": 1.0, "grad_accum": 1.0,
                    "v_head_dim": arrays.get("head_dim", 0.0),
                    "rope_dim": np.where(np.asarray(arrays.get("learned_positions", 0.0)) == 1, 0.0,
                                         arrays.get("head_dim", 0.0)),
                    "layer_norm": arrays.get("norm_bias", 0.0)}
        values = {f.name: arrays.get(f.name, defaults.get(f.name, 0.0)) for f in fields(cls)}
        shaped = np.broadcast_arrays(*[np.atleast_1d(np.asarray(v, dtype=np.float64))
                                       for v in values.values()])
        return cls(**{k: np.ascontiguousarray(a) for k, a in zip(values, shaped)})

    @classmethod
    def from_specs(cls, specs: Sequence[JobSpec]) -> Columns:
        rows = [_spec_values(s) for s in specs]
        return cls(**{f.name: np.array([r[f.name] for r in rows], dtype=np.float64)
                      for f in fields(cls)})


def model_values(m: ModelSpec) -> dict[str, float]:
    """The architecture columns of one model."""
    return {
        "family": FAMILY_CODES[m.family],
        "layers": m.layers, "hidden": m.hidden, "heads": m.heads, "kv_heads": m.kv_heads,
        "head_dim": m.dim_per_head, "ffn": m.ffn, "vocab": m.vocab,
        "max_positions": m.max_positions,
        "learned_positions": m.position == "learned", "type_vocab": m.type_vocab,
        "embedding_norm": m.family == "bert", "final_norm": m.family != "bert",
        "norm_bias": m.norm == "layernorm", "gated_mlp": m.mlp in GATED_MLPS,
        "qkv_bias": m.qkv_bias, "out_bias": m.out_bias, "mlp_bias": m.mlp_bias,
        "tied_embeddings": m.tied_embeddings, "pooler": m.pooler,
        "v_head_dim": m.value_dim, "parallel_block": m.block == "parallel",
        "block_norms": m.block_norms, "qk_norm": QK_NORMS.index(m.qk_norm),
        "attention_sinks": m.attention_sinks, "local_layers": m.local_layers,
        "attn_softcap": m.attn_softcap > 0, "final_softcap": m.final_softcap > 0,
        "window": m.sliding_window, "mla": m.mla, "q_lora_rank": m.q_lora_rank,
        "kv_lora_rank": m.kv_lora_rank, "rope_head_dim": m.rope_head_dim,
        "mla_latent_cache": m.mla and m.mla_cache == "latent",
        "experts": m.experts, "experts_per_token": m.experts_per_token,
        "expert_ffn": m.routed_ffn if m.experts else 0, "shared_ffn": m.shared_ffn_total,
        "shared_expert_gate": m.shared_expert_gate, "moe_layers": m.moe_layers,
        "router_bias": m.router_bias, "router_fp32_logits": m.router_fp32_logits,
        "rope_dim": m.rope_dim if m.position == "rope" else 0, "layer_norm": m.norm != "rmsnorm",
        "geglu": m.mlp == "geglu",
        "gelu_ops": ACTIVATIONS.index(m.activation),
        "sdpa_mask": m.sdpa_mask,
        "attn_dropout": m.attention_dropout, "hidden_dropout": m.hidden_dropout,
        "embedding_dropout": m.embedding_dropout,
    }


def _spec_values(spec: JobSpec) -> dict[str, float]:
    m, w, o, p = spec.model, spec.workload, spec.optimizer, spec.parallel
    targets = set(w.lora_targets) if w.kind == "lora" else set()
    return {
        **model_values(m),
        "batch": spec.batch, "seq": spec.seq, "gen_tokens": spec.gen_tokens,
        "training": w.training, "lora": w.kind == "lora",
        # transformers keeps a KV cache through a training forward unless use_cache=False or
        # gradient checkpointing (which turns it off); encoders have none
        "train_cache": w.training and w.use_cache and spec.recompute not in ("full", "op") and m.decoder,
        "lora_rank": w.lora_rank if w.kind == "lora" else 0,
        **{f"lora_{t}": t in targets for t in ("q", "k", "v", "o", "gate", "up", "down")},
        "lora_dropout": w.lora_dropout if w.kind == "lora" else 0.0,
        "dtype_bytes": spec.dtype_bytes, "mixed": spec.mixed,
        "optimizer_states": o.states_per_param, "foreach": o.impl == "foreach",
        **technique_values(spec),
        "recompute_selective": spec.recompute == "selective",
        "recompute_full": spec.recompute in ("full", "op"),  # op: a full checkpoint that keeps more
        "recompute_op": spec.recompute == "op",
        "eager_attention": spec.attention == "eager",
        "sm": 10.0 * spec.hardware.capability[0] + spec.hardware.capability[1],
        "tp": p.tp, "pp": p.pp, "dp": p.dp, "zero": p.zero, "deepspeed": p.stack == "deepspeed",
        "sequence_parallel": p.sequence_parallel, "ep": p.ep,
    }


def technique_values(spec: JobSpec) -> dict[str, float]:
    """The technique columns of one job (formulas/techniques.py reads them)."""
    from memsweep.formulas.techniques import quant_layout  # the byte layouts live with their formulas

    o, w = spec.optimizer, spec.workload
    bits, group, group_bytes, in_bytes, out_bytes = quant_layout(spec.quant, spec.quant_group, w.double_quant)
    serve = w.kind == "serve"
    return {
        "opt_8bit": o.name in ("adamw8bit", "paged_adamw8bit"), "opt_lion": o.name == "lion",
        "opt_adafactor": o.name == "adafactor", "opt_first_moment": o.first_moment,
        "in_backward": o.in_backward and w.training,
        "loss_chunks": spec.loss.chunks, "fused_loss": spec.loss_kernel == "fused_linear",
        "fused_ce": spec.loss_kernel == "fused", "fused_norm": spec.kernels.norm == "fused",
        "fused_mlp": spec.kernels.mlp == "fused", "fused_rope": spec.kernels.rope == "fused",
        "compiled": spec.kernels.compile,
        "compiled_loss": spec.kernels.compile and spec.kernels.compile_loss,
        "q_bits": bits, "q_group": group, "q_group_bytes": group_bytes, "q_in_bytes": in_bytes,
        "q_out_bytes": out_bytes, "kv_bytes": spec.kv_bytes if spec.kv_dtype != "auto" else 0.0,
        "prefill_all_logits": w.prefill_logits == "all", "serve": serve,
        "offload_optimizer": spec.offload.optimizer, "offload_params": spec.offload.params,
        "offload_activations": spec.offload.activations, "grad_accum": spec.grad_accum,
        # DeepSpeed's offload runs the model in 16 bits, its fp32 master on the CPU
        "param_policy": spec.mixed and (spec.mixed_policy == "param_dtype" or spec.offload.optimizer),
        "kbit": spec.kbit,
        "block_size": w.block_size, "gpu_util": w.gpu_util, "max_batched_tokens": w.max_batched_tokens,
        "max_seqs": w.max_seqs, "graph_bytes": w.graph_mib * 2**20,
    }


# --- pipeline stages ------------------------------------------------------------------------

def stage_layers(layers: int, pp: int) -> tuple[int, ...]:
    """Blocks per pipeline stage. Even when pp divides the layers; otherwise each stage takes
    layers // pp and the rest go one each to the middle stages, the last ones first (they hold the
    fewest micro-batches in flight), then to the last stage: the first and last stages, which
    also hold the embedding and the loss, stay the lighter ones, as Llama 3 split 126 layers over
    16 stages (7, 8 x 14, 7: Dubey et al. 2024, sec. 3.3.2; Megatron-LM's
    --decoder-first/last-pipeline-num-layers)."""
    q, r = divmod(layers, pp)
    sizes = [q] * pp
    middle = list(range(pp - 2, 0, -1)) + [pp - 1, 0]
    for k in middle[:r]:
        sizes[k] += 1
    return tuple(sizes)


def stage_layers_max(c: Columns) -> Array:
    """The most blocks one pipeline stage holds (`stage_layers`)."""
    q = np.floor(c.layers / c.pp)
    return q + (c.layers - q * c.pp > 0)


def pipeline_shards(c: Columns) -> Array:
    """What a pipeline divides per-layer state by on its largest stage: pp when it divides the
    layers, layers / (the largest stage's blocks) otherwise."""
    return np.where(c.pp > 1, c.layers / stage_layers_max(c), 1.0)


def in_flight_layers(c: Columns) -> Array:
    """1F1B (PipeDream-Flush, Narayanan et al. 2021): stage k keeps the activations of pp - k
    micro-batches, so the stage holding the most keeps max_k (pp - k) x blocks_k layers' worth of
    one micro-batch: all the layers when pp divides them (Korthikanti et al. 2022, sec. 4.2.3),
    fewer with `stage_layers`' uneven split (405B on 16 stages: 15 x 8 = 120 of 126)."""
    pp = c.pp
    q = np.floor(c.layers / pp)
    r = c.layers - q * pp
    middle = np.maximum(pp - 2, 0)
    extra = np.minimum(r, middle)  # the later middle stages' one more block each
    last = r - extra
    plain_second = np.where((pp > 2) & (extra < middle), (pp - 1) * q, 0.0)
    first_extra = np.where(extra > 0, (extra + 1) * (q + 1), 0.0)
    most = np.maximum(np.maximum(pp * q, plain_second), np.maximum(first_extra, q + last))
    return np.where(pp > 1, most, c.layers)


# --- exact parameter counts (HF module structure), vectorized over Columns -------------------

def norm_params(c: Columns, width: Array | float) -> Array:
    """One norm over `width` features: a weight, and a bias for LayerNorm."""
    return width * (1 + c.norm_bias)


def embedding_params(c: Columns) -> Array:
    """Token table V*h, learned position table, bert token types and embedding norm."""
    return (c.vocab * c.hidden + c.learned_positions * c.max_positions * c.hidden
            + c.type_vocab * c.hidden + c.embedding_norm * norm_params(c, c.hidden))


def q_width(c: Columns) -> Array:
    """Queries (and keys per KV head) are heads * head_dim wide; hidden only when head_dim = h / a."""
    return c.heads * c.head_dim


def mlp_matrices(c: Columns, ffn: Array) -> Array:
    """One MLP's weight matrices: gated (gate, up, down: 3*h*f) or GELU (up, down: 2*h*f)."""
    return np.where(c.gated_mlp == 1, 3.0, 2.0) * c.hidden * ffn


def mlp_biases(c: Columns, ffn: Array) -> Array:
    return np.where(c.gated_mlp == 1, 2 * ffn, ffn) + c.hidden


def attention_matrices(c: Columns) -> Array:
    """Per layer: Q (h x a*d), K and V (h x kv*d each), O (a*d_v x h); MLA (DeepSeek-AI 2024,
    sec. 2.1): q = q_b(norm(q_a(x))) (or one q_proj without q compression), a latent
    [c_kv, k_rope] = kv_a(x), and per-head k_nope and v = kv_b(norm(c_kv))."""
    h, q, kv = c.hidden, q_width(c), c.kv_heads * c.head_dim
    qlr, klr, nope = c.q_lora_rank, c.kv_lora_rank, c.head_dim - c.rope_head_dim
    mla = (np.where(qlr > 0, h * qlr + qlr * q, h * q) + h * (klr + c.rope_head_dim)
           + klr * c.heads * (nope + c.v_head_dim))
    return np.where(c.mla == 1, mla, h * (q + 2 * kv)) + c.heads * c.v_head_dim * h


def attention_params(c: Columns) -> Array:
    """Per layer: the matrices, optional biases (q, k, v; o), MLA's two latent norms, q/k norms
    and attention sinks."""
    q, kv = q_width(c), c.kv_heads * c.head_dim
    biases = c.qkv_bias * (q + 2 * kv) + c.out_bias * c.hidden
    mla_norms = np.where(c.mla == 1, norm_params(c, c.kv_lora_rank) + norm_params(c, c.q_lora_rank), 0.0)
    qk_norm = np.where(c.qk_norm == 1, 2 * c.head_dim, np.where(c.qk_norm == 2, q + kv, 0.0))
    return (attention_matrices(c) + biases + mla_norms + norm_params(c, qk_norm)
            + c.attention_sinks * c.heads)


def dense_mlp_params(c: Columns, ffn: Array) -> Array:
    """One MLP of hidden size `ffn` with its optional biases."""
    return mlp_matrices(c, ffn) + c.mlp_bias * mlp_biases(c, ffn)


def expert_params(c: Columns) -> Array:
    """One routed expert (an MLP of `expert_ffn`)."""
    return dense_mlp_params(c, c.expert_ffn)


def moe_matrices(c: Columns) -> Array:
    """One MoE layer's matrices: the router (h x E), every routed expert, the shared experts (one
    MLP of their joint size, as DeepSeek and Qwen2-MoE build them) and Qwen2-MoE's shared gate."""
    shared = np.where(c.shared_ffn > 0, mlp_matrices(c, c.shared_ffn), 0.0)
    return c.experts * (c.hidden + mlp_matrices(c, c.expert_ffn)) + shared + c.shared_expert_gate * c.hidden


def moe_mlp_params(c: Columns) -> Array:
    """One MoE layer: its matrices, the router bias and the experts' biases."""
    shared = np.where(c.shared_ffn > 0, mlp_biases(c, c.shared_ffn), 0.0)
    return (moe_matrices(c) + c.router_bias * c.experts
            + c.mlp_bias * (c.experts * mlp_biases(c, c.expert_ffn) + shared))


def linear_elements(c: Columns) -> Array:
    """Weight elements of every layer's matrices (what autocast copies to 16-bit)."""
    return (c.layers * attention_matrices(c) + (c.layers - c.moe_layers) * mlp_matrices(c, c.ffn)
            + c.moe_layers * moe_matrices(c))


def matrix_sides(c: Columns) -> tuple[Array, Array, Array]:
    """Every block's weight matrices (the ones quantization stores), summed over the layers:
    (elements, input rows: sum of d_in, output rows: sum of d_out). Routers (h x E) excluded:
    GPTQ / AWQ / bitsandbytes keep them 16-bit, as the norms."""
    h, q, kv, dv = c.hidden, q_width(c), c.kv_heads * c.head_dim, c.heads * c.v_head_dim
    qlr, klr, nope = c.q_lora_rank, c.kv_lora_rank, c.head_dim - c.rope_head_dim
    mla = c.mla == 1
    # attention (d_in, d_out): q, k, v, o; MLA: q_a + q_b (or q), kv_a, kv_b, o
    a_in = np.where(mla, np.where(qlr > 0, h + qlr, h) + h + klr, 3 * h) + dv
    a_out = np.where(mla, np.where(qlr > 0, qlr + q, q) + klr + c.rope_head_dim
                     + c.heads * (nope + c.v_head_dim), q + 2 * kv) + h
    n_mlp = np.where(c.gated_mlp == 1, 2.0, 1.0)  # (gate,) up: h -> f; down: f -> h

    def mlp(f: Array) -> tuple[Array, Array]:
        return n_mlp * h + f, n_mlp * f + h

    d_in, d_out = mlp(c.ffn)
    e_in, e_out = mlp(c.expert_ffn)
    s_in, s_out = mlp(c.shared_ffn)
    shared = c.shared_ffn > 0
    moe_in = c.experts * e_in + np.where(shared, s_in, 0.0)
    moe_out = c.experts * e_out + np.where(shared, s_out, 0.0)
    dense = c.layers - c.moe_layers
    elements = linear_elements(c) - c.moe_layers * c.experts * h
    return (elements, c.layers * a_in + dense * d_in + c.moe_layers * moe_in,
            c.layers * a_out + dense * d_out + c.moe_layers * moe_out)


def mlp_params_total(c: Columns) -> Array:
    """Every layer's MLP: dense layers of `ffn`, MoE layers of experts."""
    return (c.layers - c.moe_layers) * dense_mlp_params(c, c.ffn) + c.moe_layers * moe_mlp_params(c)


def mlp_params(c: Columns) -> Array:
    """Per layer (the average over the layers for a model with dense and MoE layers)."""
    return mlp_params_total(c) / c.layers


def layer_norm_params(c: Columns) -> Array:
    """Per layer: `block_norms` norms of h (2; 1 in a shared-norm parallel block; 4 in Gemma-2/3)."""
    return c.block_norms * norm_params(c, c.hidden)


def layer_params(c: Columns) -> Array:
    return attention_params(c) + mlp_params(c) + layer_norm_params(c)


def base_params(c: Columns) -> Array:
    """Exact parameter count of the model (equals the HF model's `num_parameters()`)."""
    head = (1 - c.tied_embeddings) * c.vocab * c.hidden
    final = c.final_norm * norm_params(c, c.hidden)
    pooler = c.pooler * (c.hidden * c.hidden + c.hidden)
    body = c.layers * (attention_params(c) + layer_norm_params(c)) + mlp_params_total(c)
    return embedding_params(c) + body + final + head + pooler


def routed_expert_params(c: Columns) -> Array:
    """Every routed expert of every MoE layer (what expert parallelism splits)."""
    return c.moe_layers * c.experts * expert_params(c)


def active_params(c: Columns) -> Array:
    """Parameters one token runs through: the routed experts count top-k times, not E times."""
    return base_params(c) - c.moe_layers * (c.experts - c.experts_per_token) * expert_params(c)


def lora_params(c: Columns) -> Array:
    """LoRA adapters: r*(d_in + d_out) per adapted matrix (Hu et al. 2021). In MoE layers
    gate/up/down adapt every routed expert and the shared experts."""
    h, q, kv = c.hidden, q_width(c), c.kv_heads * c.head_dim
    attn = (c.lora_q * (h + q) + c.lora_k * (h + kv) + c.lora_v * (h + kv)
            + c.lora_o * (c.heads * c.v_head_dim + h))
    # MLA: q adapts q_a + q_b (or q_proj), k the joint kv_a, v the expansion kv_b
    qlr, klr = c.q_lora_rank, c.kv_lora_rank
    mla_q = np.where(qlr > 0, (h + qlr) + (qlr + q), h + q)
    mla_k = h + klr + c.rope_head_dim
    mla_v = klr + c.heads * (c.head_dim - c.rope_head_dim + c.v_head_dim)
    attn = np.where(c.mla == 1, c.lora_q * mla_q + c.lora_k * mla_k + c.lora_v * mla_v
                    + c.lora_o * (c.heads * c.v_head_dim + h), attn)
    n_mlp = c.lora_gate + c.lora_up + c.lora_down
    dense = (c.layers - c.moe_layers) * n_mlp * (h + c.ffn)
    moe = c.moe_layers * n_mlp * (c.experts * (h + c.expert_ffn)
                                  + np.where(c.shared_ffn > 0, h + c.shared_ffn, 0.0))
    return c.lora * c.lora_rank * (c.layers * attn + dense + moe)


def trainable_params(c: Columns) -> Array:
    """Parameters that get gradients and optimizer state: all (train), adapters (lora), none."""
    return np.where(c.lora == 1, lora_params(c), c.training * base_params(c))
