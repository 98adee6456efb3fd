"""The structural terms `detailed`'s activation coefficients multiply (one definition, used by
detailed.py and by scripts/derive_coefficients.py, which fits the coefficients)."""

from __future__ import annotations

import numpy as np

from memsweep.columns import Array, Columns, linear_elements, lora_params, mlp_matrices

BASIS = ("Lth", "Ltkvd", "Ltkv", "Ltf", "Lta", "Lt", "Ltr", "Llinear", "Llora", "Lh", "Lf", "Lr",
         "th", "tkvd", "tkv", "tf", "ta", "tr", "tV", "t", "Vh", "sd", "s", "h", "V", "Lbas2", "Ls2", "bas2", "one")
"""L layers, t = b*s tokens, h hidden, a heads, kvd = kv*d the K/V width with GQA (0 without:
h carries it), kv = kv*d always (sdpa keeps K and V at that width, shared by the query heads with
`enable_gqa`), f FFN, r LoRA rank, V vocabulary; 'linear' = one block's matrices; terms without L
are what the first or last layer keeps differently."""


def layer_params(c: Columns) -> Array:
    """Parameters of one block's matrices (Q, K, V, O and the MLP)."""
    h, a, d, kv = c.hidden, c.heads, c.head_dim, c.kv_heads
    return h * (a * d + 2 * kv * d) + a * d * h + np.where(c.gated_mlp == 1, 3.0, 2.0) * h * c.ffn


def basis_values(c: Columns) -> np.ndarray:
    """The structural terms of `BASIS`, one row per configuration."""
    L, t, s, h, a, f, V = c.layers, c.batch * c.seq, c.seq, c.hidden, c.heads, c.ffn, c.vocab
    d = c.head_dim
    kvd = np.where(c.kv_heads != c.heads, c.kv_heads * d, 0.0)
    lora_layer = lora_params(c) / L
    r = c.lora_rank
    terms = {
        "Lth": L * t * h, "Ltkvd": L * t * kvd, "Ltkv": L * t * c.kv_heads * d, "Ltf": L * t * f, "Lta": L * t * a, "Lt": L * t,
        "Ltr": L * t * r, "Llinear": L * layer_params(c), "Llora": L * lora_layer, "Lh": L * h, "Lf": L * f,
        "Lr": L * r, "th": t * h, "tkvd": t * kvd, "tkv": t * c.kv_heads * d, "tf": t * f, "ta": t * a, "tr": t * r,
        "tV": t * V, "t": t, "Vh": V * h, "sd": s * d, "s": s, "h": h, "V": V,
        "Lbas2": L * c.batch * a * s * s, "Ls2": L * s * s, "bas2": c.batch * a * s * s, "one": np.ones_like(L),
    }
    return np.stack([terms[n] for n in BASIS], axis=-1)


# --- issue 10: the terms of the newer architectures ------------------------------------------
# Each is zero for a model with none of the features (classic llama / gpt2 / bert), so the exact
# tables above stay valid; `coefficients_ext.py` holds bytes per term, fitted on the residual of
# those tables over a design of small models that switch the features on at random.
EXT_BASIS = (
    "Ltq", "tq",                                                   # q width a*d beyond h (explicit head_dim)
    "Llinx",                                                       # weight elements beyond the classic block's
    "Mtf", "Mf", "Mth", "Mt", "MtE", "Mtk", "Mtkh", "Mtkf", "MPh", "MPf", "Mtkr", "MPr",  # MoE layers
    "Mtfs", "Mtsg", "Mthsg", "Mthsh", "th_moe1", "tE_moe1", "tkh_moe1", "tkf_moe1",  # shared experts; MoE first layer
    "Ltql", "Ltkl_m", "Ltr_m", "Ltar_m", "Ltav_m", "Ltq_m", "Lt_m", "Lt_mq",            # MLA
    "tkl_m", "tar_m", "tav_m", "tq_m", "t_m", "Lth_m", "th_m", "tql",
    "Ltq_qk", "Ltkv_qk", "Lta_qkh", "Ltkv_qkh", "Lt_qkf",           # q/k norms
    "tkv_qk", "tkv_qkh", "t_qkf",                                  # q/k norms of the first layer (frozen K)
    "Lth_nx", "Lt_nx", "th_nx", "t_nx",                            # norms per block beyond 2 (Gemma) or short of it
    "Lth_par", "Lt_par", "th_par", "Lth_pg",                       # parallel blocks (Lth_pg: with a GELU MLP)
    "tf_par", "tf_pg", "th_pg", "th_pln", "t_pln", "t_par",        # parallel blocks' first layer
    "Lth_ln", "Lt_ln", "th_ln", "t_ln", "Lth_lnx", "th_lnx",        # LayerNorm in a modern decoder (lnx: norms short of 2)
    "Dtf_gelu", "tf_gelu", "Mtkf_gelu", "Dtf_geglu", "Dth_gelu", "th_gelu",  # GELU / GeGLU MLPs
    "Lta_part", "Ltkv_part", "s_rd",                               # partial rotary
    "s2_win", "Ls2_loc",                                           # sliding-window masks (Ls2_loc: b*s^2 per layer)
    "Ltq_loc", "Ltkv_loc",                                         # masked local layers repeat K/V (no enable_gqa)
    "Lbas_sink", "Lbas2_sink",                                     # attention sinks (eager)
)
EAGER_ONLY = frozenset({"Lbas_sink", "Lbas2_sink"})
"""Terms only eager attention can have (the sink columns of the b*a*s^2 scores): an sdpa fit leaves
them out, so least squares cannot give them spurious bytes that grow with s^2. (Per-layer window
masks are not among them: sdpa turns a bool mask into a float one of the query's dtype per call,
and its backward keeps it.)"""


def autocast_elements(c: Columns) -> Array:
    """Weight elements autocast copies to 16-bit (and autograd saves): every layer's matrices but
    the routed experts', which transformers runs with grouped_mm in the weights' own dtype, outside
    autocast (integrations/moe.py; the reference's Experts likewise)."""
    return linear_elements(c) - c.moe_layers * c.experts * mlp_matrices(c, c.expert_ffn)


def newer_architecture(c: Columns) -> Array:
    """Rows whose EXT_BASIS terms can be non-zero: llama-family models with any newer feature
    (keep in step with the terms above)."""
    return (c.family == 1) & ((c.heads * c.head_dim != c.hidden) | (c.moe_layers > 0) | (c.mla == 1)
                              | (c.qk_norm > 0) | (c.block_norms != 2) | (c.parallel_block == 1)
                              | (c.layer_norm == 1) | (c.gated_mlp == 0) | (c.geglu == 1)
                              | (c.rope_dim != c.head_dim) | (c.local_layers > 0) | (c.attention_sinks == 1))


def moe_padding(c: Columns) -> Array:
    """Token copies added so every expert gets ceil(t*k / E) (the reference's balanced grouping)."""
    copies = c.batch * c.seq * c.experts_per_token
    e = np.maximum(c.experts, 1.0)
    return np.where(c.experts > 0, e * np.ceil(copies / e) - copies, 0.0)


def local_masked(c: Columns) -> Array:
    """1 where local layers need a window mask in training / prefill (the sequence is longer)."""
    return ((c.local_layers > 0) & (c.seq > c.window)).astype(float)


def ext_basis_values(c: Columns) -> np.ndarray:
    L, M, t, s, h = c.layers, c.moe_layers, c.batch * c.seq, c.seq, c.hidden
    a, d, kv, f, b = c.heads, c.head_dim, c.kv_heads, c.ffn, c.batch
    D = L - M
    E, k, fe, r = c.experts, c.experts_per_token, c.expert_ffn, c.lora_rank
    P = moe_padding(c)
    mla, qkn = c.mla, (c.qk_norm > 0).astype(float)
    # Llama-4's weightless L2 norm (3) saves what a per-head norm saves, less the weight's product:
    # counted as a per-head norm (an approximation, docs/models.md)
    qkh, qkf = ((c.qk_norm == 1) | (c.qk_norm == 3)).astype(float), (c.qk_norm == 2).astype(float)
    nx = c.block_norms - 2
    par = c.parallel_block
    ln, gelu = c.layer_norm, 1 - c.gated_mlp
    moe1 = ((c.experts > 0) & (c.moe_layers == L)).astype(float)  # the first layer is an MoE layer
    rd = np.where(c.mla == 1, c.rope_head_dim, c.rope_dim)
    part = np.where((c.mla == 0) & (c.rope_dim > 0), d - c.rope_dim, 0.0)
    qx = a * d - h
    loc = local_masked(c)
    gqa = ((c.kv_heads != c.heads) & (c.mla == 0)).astype(float)  # sdpa shares K/V heads unless masked
    terms = {
        "Ltq": L * t * qx, "tq": t * qx,
        "Llinx": autocast_elements(c) - L * layer_params(c),
        "Mtf": M * t * f, "Mf": M * f, "Mth": M * t * h, "Mt": M * t, "MtE": M * t * E, "Mtk": M * t * k,
        "Mtkh": M * t * k * h, "Mtkf": M * t * k * fe, "MPh": M * P * h, "MPf": M * P * fe,
        "Mtkr": M * t * k * r, "MPr": M * P * r, "Mtfs": M * t * c.shared_ffn, "Mtsg": M * t * c.shared_expert_gate,
        "Mthsg": M * t * h * c.shared_expert_gate, "Mthsh": M * t * h * (c.shared_ffn > 0),
        "th_moe1": moe1 * t * h, "tE_moe1": moe1 * t * E, "tkh_moe1": moe1 * t * k * h, "tkf_moe1": moe1 * t * k * fe,
        "Ltql": L * t * c.q_lora_rank, "Ltkl_m": L * t * c.kv_lora_rank, "Ltr_m": L * t * mla * rd,
        "Ltar_m": L * t * a * mla * rd, "Ltav_m": L * t * a * mla * c.v_head_dim, "Ltq_m": L * t * a * d * mla,
        "Lt_m": L * t * mla, "Lt_mq": L * t * (c.q_lora_rank > 0),
        "tkl_m": t * c.kv_lora_rank, "tar_m": t * a * mla * rd, "tav_m": t * a * mla * c.v_head_dim,
        "tq_m": t * a * d * mla, "t_m": t * mla, "Lth_m": L * t * h * mla, "th_m": t * h * mla,
        "tql": t * c.q_lora_rank,
        "Ltq_qk": L * t * a * d * qkn, "Ltkv_qk": L * t * kv * d * qkn, "Lta_qkh": L * t * a * qkh,
        "Ltkv_qkh": L * t * kv * qkh, "Lt_qkf": L * t * qkf,
        "tkv_qk": t * kv * d * qkn, "tkv_qkh": t * kv * qkh, "t_qkf": t * qkf,
        "Lth_nx": L * t * h * nx, "Lt_nx": L * t * nx, "th_nx": t * h * nx, "t_nx": t * nx,
        "Lth_par": L * t * h * par, "Lt_par": L * t * par, "th_par": t * h * par,
        "Lth_pg": L * t * h * par * gelu,
        "tf_par": t * f * par, "tf_pg": t * f * par * gelu, "th_pg": t * h * par * gelu,
        "th_pln": t * h * par * ln, "t_pln": t * par * ln, "t_par": t * par,
        "Lth_ln": L * t * h * ln * c.block_norms, "Lt_ln": L * t * ln * c.block_norms, "th_ln": t * h * ln,
        "t_ln": t * ln, "Lth_lnx": L * t * h * ln * nx, "th_lnx": t * h * ln * nx,
        "Dtf_gelu": D * t * f * gelu, "tf_gelu": t * f * gelu, "Mtkf_gelu": M * t * k * fe * gelu,
        "Dtf_geglu": D * t * f * c.geglu, "Dth_gelu": D * t * h * gelu, "th_gelu": t * h * gelu,
        "Lta_part": L * t * a * part, "Ltkv_part": L * t * kv * part, "s_rd": s * (rd - d) * (c.learned_positions == 0),
        "s2_win": s * s * loc, "Ls2_loc": c.local_layers * loc * b * s * s,
        "Ltq_loc": c.local_layers * loc * t * a * d * gqa, "Ltkv_loc": c.local_layers * loc * t * kv * d * gqa,
        "Lbas_sink": L * b * a * s * c.attention_sinks, "Lbas2_sink": L * b * a * s * s * c.attention_sinks,
    }
    return np.stack([terms[n] for n in EXT_BASIS], axis=-1)


EXT_CLASSES = ("base", "layernorm", "gemma", "parallel", "moe", "mla")
"""Families of the newer architectures, each with its own fit of EXT_BASIS (features interact
within a family, e.g. a parallel block's shared norm with a GELU MLP): MLA (DeepSeek), other MoE,
parallel blocks (Falcon, GPT-NeoX, Cohere), Gemma (post-norms or GeGLU), LayerNorm decoders
(Starcoder2), and the rest (explicit head_dim, q/k norms, windows, sinks, partial rotary)."""


def ext_class(c: Columns) -> Array:
    """Index into EXT_CLASSES per row."""
    return np.select(
        [c.mla == 1, c.moe_layers > 0, c.parallel_block == 1, (c.block_norms == 4) | (c.geglu == 1), c.layer_norm == 1],
        [5, 4, 3, 2, 1], default=0)
