"""The structural terms `detailed`'s activation coefficients multiply (one definition, used by
detailed.py and by scripts/derive_coefficients.py, which fits the coefficients)."""

from __future__ import annotations

import numpy as np

from memsweep.columns import Array, Columns, lora_params

BASIS = ("Lth", "Ltkvd", "Ltf", "Lta", "Lt", "Ltr", "Llinear", "Llora", "Lh", "Lf", "Lr",
         "th", "tkvd", "tf", "ta", "tr", "tV", "t", "Vh", "sd", "s", "h", "V", "Lbas2", "Ls2", "one")
"""L layers, t = b*s tokens, h hidden, a heads, kv*d K/V width (0 without GQA: h carries it),
f FFN, r LoRA rank, V vocabulary; 'linear' = one block's matrices; terms without L are what
the first or last layer keeps differently."""


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
        "Lth": L * t * h, "Ltkvd": L * t * kvd, "Ltf": L * t * f, "Lta": L * t * a, "Lt": L * t,
        "Ltr": L * t * r, "Llinear": L * layer_params(c), "Llora": L * lora_layer, "Lh": L * h, "Lf": L * f,
        "Lr": L * r, "th": t * h, "tkvd": t * kvd, "tf": t * f, "ta": t * a, "tr": t * r,
        "tV": t * V, "t": t, "Vh": V * h, "sd": s * d, "s": s, "h": h, "V": V,
        "Lbas2": L * c.batch * a * s * s, "Ls2": L * s * s, "one": np.ones_like(L),
    }
    return np.stack([terms[n] for n in BASIS], axis=-1)
