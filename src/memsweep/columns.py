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

from memsweep.specs import JobSpec

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
    head_dim: Array
    ffn: Array
    vocab: Array
    max_positions: Array
    learned_positions: Array  # 1: a learned position table (gpt2, bert); 0: rope
    type_vocab: Array  # bert token-type table rows
    embedding_norm: Array  # 1: a norm after the embeddings (bert)
    final_norm: Array  # 1: a norm before the LM head (gpt2, llama)
    norm_bias: Array  # 1: LayerNorm (weight + bias); 0: RMSNorm (weight only)
    gated_mlp: Array  # 1: SwiGLU (gate, up, down); 0: GELU (up, down)
    qkv_bias: Array
    out_bias: Array
    mlp_bias: Array
    tied_embeddings: Array
    pooler: Array
    # workload
    batch: Array
    seq: Array
    gen_tokens: Array
    training: Array  # 1 for train and lora
    lora: Array
    lora_rank: Array
    lora_q: Array
    lora_k: Array
    lora_v: Array
    lora_o: Array
    lora_gate: Array
    lora_up: Array
    lora_down: Array
    # precision
    dtype_bytes: Array
    mixed: Array
    # optimizer
    optimizer_states: Array  # state tensors per trainable parameter: adam 2, momentum 1, sgd 0
    foreach: Array
    # activation memory choices
    recompute_selective: Array
    recompute_full: Array
    eager_attention: Array
    # parallel layout
    tp: Array
    pp: Array
    dp: Array
    zero: Array
    sequence_parallel: Array

    def __post_init__(self) -> None:
        n = {np.shape(getattr(self, f.name)) for f in fields(self)}
        if len(n) != 1:
            raise ValueError(f"Columns need arrays of one shape, got {sorted(n)}")

    def __len__(self) -> int:
        return int(np.size(self.layers))

    @classmethod
    def from_arrays(cls, **arrays: object) -> Columns:
        """Build from scalars and arrays broadcast to one length. Omitted columns are 0, except
        tp, pp and dp (1): callers that evaluate real configurations pass every column."""
        unknown = set(arrays) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown columns: {sorted(unknown)}")
        values = {f.name: arrays.get(f.name, 1.0 if f.name in ("tp", "pp", "dp") else 0.0)
                  for f in fields(cls)}
        shaped = np.broadcast_arrays(*[np.atleast_1d(np.asarray(v, dtype=np.float64))
                                       for v in values.values()])
        return cls(**{k: np.ascontiguousarray(a) for k, a in zip(values, shaped)})

    @classmethod
    def from_specs(cls, specs: Sequence[JobSpec]) -> Columns:
        rows = [_spec_values(s) for s in specs]
        return cls(**{f.name: np.array([r[f.name] for r in rows], dtype=np.float64)
                      for f in fields(cls)})


def _spec_values(spec: JobSpec) -> dict[str, float]:
    m, w, o, p = spec.model, spec.workload, spec.optimizer, spec.parallel
    targets = set(w.lora_targets) if w.kind == "lora" else set()
    return {
        "family": FAMILY_CODES[m.family],
        "layers": m.layers, "hidden": m.hidden, "heads": m.heads, "kv_heads": m.kv_heads,
        "head_dim": m.dim_per_head, "ffn": m.ffn, "vocab": m.vocab,
        "max_positions": m.max_positions,
        "learned_positions": m.position == "learned", "type_vocab": m.type_vocab,
        "embedding_norm": m.family == "bert", "final_norm": m.family != "bert",
        "norm_bias": m.norm == "layernorm", "gated_mlp": m.mlp == "swiglu",
        "qkv_bias": m.qkv_bias, "out_bias": m.out_bias, "mlp_bias": m.mlp_bias,
        "tied_embeddings": m.tied_embeddings, "pooler": m.pooler,
        "batch": spec.batch, "seq": spec.seq, "gen_tokens": spec.gen_tokens,
        "training": w.training, "lora": w.kind == "lora",
        "lora_rank": w.lora_rank if w.kind == "lora" else 0,
        **{f"lora_{t}": t in targets for t in ("q", "k", "v", "o", "gate", "up", "down")},
        "dtype_bytes": spec.dtype_bytes, "mixed": spec.mixed,
        "optimizer_states": o.states_per_param, "foreach": o.impl == "foreach",
        "recompute_selective": spec.recompute == "selective",
        "recompute_full": spec.recompute == "full",
        "eager_attention": spec.attention == "eager",
        "tp": p.tp, "pp": p.pp, "dp": p.dp, "zero": p.zero,
        "sequence_parallel": p.sequence_parallel,
    }


# --- exact parameter counts (HF module structure), vectorized over Columns -------------------

def embedding_params(c: Columns) -> Array:
    """Token table V*h, learned position table, bert token types and embedding norm."""
    norm = c.hidden * (1 + c.norm_bias)
    return (c.vocab * c.hidden + c.learned_positions * c.max_positions * c.hidden
            + c.type_vocab * c.hidden + c.embedding_norm * norm)


def attention_params(c: Columns) -> Array:
    """Per layer: Q (h x a*d), K and V (h x kv*d each), O (a*d x h), optional biases."""
    q = c.heads * c.head_dim
    kv = c.kv_heads * c.head_dim
    return (c.hidden * (q + 2 * kv) + q * c.hidden
            + c.qkv_bias * (q + 2 * kv) + c.out_bias * c.hidden)


def mlp_params(c: Columns) -> Array:
    """Per layer: SwiGLU gate+up+down (3*h*f) or GELU up+down (2*h*f), optional biases."""
    matrices = np.where(c.gated_mlp == 1, 3.0, 2.0) * c.hidden * c.ffn
    biases = np.where(c.gated_mlp == 1, 2 * c.ffn, c.ffn) + c.hidden
    return matrices + c.mlp_bias * biases


def layer_norm_params(c: Columns) -> Array:
    """Per layer: two norms, h weights each (+ h biases for LayerNorm)."""
    return 2 * c.hidden * (1 + c.norm_bias)


def layer_params(c: Columns) -> Array:
    return attention_params(c) + mlp_params(c) + layer_norm_params(c)


def base_params(c: Columns) -> Array:
    """Exact parameter count of the model (equals the HF model's `num_parameters()`)."""
    head = (1 - c.tied_embeddings) * c.vocab * c.hidden
    final = c.final_norm * c.hidden * (1 + c.norm_bias)
    pooler = c.pooler * (c.hidden * c.hidden + c.hidden)
    return embedding_params(c) + c.layers * layer_params(c) + final + head + pooler


def lora_params(c: Columns) -> Array:
    """LoRA adapters: r*(d_in + d_out) per adapted matrix (Hu et al. 2021), per layer."""
    h, q, kv = c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim
    per_layer = (c.lora_q * (h + q) + c.lora_k * (h + kv) + c.lora_v * (h + kv)
                 + c.lora_o * (q + h) + c.lora_gate * (h + c.ffn) + c.lora_up * (h + c.ffn)
                 + c.lora_down * (c.ffn + h))
    return c.lora * c.lora_rank * c.layers * per_layer


def trainable_params(c: Columns) -> Array:
    """Parameters that get gradients and optimizer state: all (train), adapters (lora), none."""
    return np.where(c.lora == 1, lora_params(c), c.training * base_params(c))
