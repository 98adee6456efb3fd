"""The four seed formulas exactly as the source documents state them (docs/formulas.md, F1-F4).

They are kept as written, undercounts included: memsweep's job is to show how far each one is
from measurement. Every constant a calibration may refit is a named field of a frozen dataclass.
All memory is bytes; every function is vectorized over `Columns`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memsweep.columns import Array, Columns, base_params, lora_params, pipeline_shards, trainable_params
from memsweep.formulas.base import Breakdown


# --- F1 "naive" (blog formula) ---------------------------------------------------------------

@dataclass(frozen=True)
class NaiveConstants:
    weight_matrices: float = 4.0
    """Square (a*d)^2 matrices per layer: Q, K, V and one MLP matrix (an undercount, kept)."""
    gradient_factor: float = 2.0
    """total = weights + gradient_factor * activations ("gradients are as many as activations")."""


def naive_weights(c: Columns, k: NaiveConstants) -> Array:
    """F1: 4*L*(a*d)^2 elements times bytes per element."""
    return k.weight_matrices * c.layers * (c.heads * c.head_dim) ** 2 * c.dtype_bytes


def naive_activations(c: Columns) -> Array:
    """F1: L*b*a*s*(s + 2d) elements (scores b*a*s^2, V and MLP output b*a*s*d each)."""
    return c.layers * c.batch * c.heads * c.seq * (c.seq + 2 * c.head_dim) * c.dtype_bytes


def naive(c: Columns, k: NaiveConstants) -> Breakdown:
    """F1. Gradients = (factor - 1) x activations for training; inference has no gradients."""
    acts = naive_activations(c)
    grads = c.training * (k.gradient_factor - 1.0) * acts
    return Breakdown.of(c.layers, weights=naive_weights(c, k), activations=acts, gradients=grads)


# --- F2 "mixed-precision training" -----------------------------------------------------------

@dataclass(frozen=True)
class MixedConstants:
    weight_bytes_per_param: float = 6.0
    """Mixed precision: an fp32 master copy (4) + an fp16 copy (2)."""
    activation_bytes_per_token_hidden_layer: float = 2.0
    """With gradient checkpointing: 2*t*h*L bytes."""
    gradient_bytes_per_param: float = 4.0
    sgd_bytes_per_param: float = 4.0
    momentum_bytes_per_param: float = 8.0
    adam_bytes_per_param: float = 12.0


def mixed_weights(all_params: Array, mixed: Array, dtype_bytes: Array, k: MixedConstants) -> Array:
    """F2 training: 6 bytes per parameter (adapters included) when mixed; the dtype's bytes when pure."""
    return np.where(mixed == 1, k.weight_bytes_per_param, dtype_bytes) * all_params


def mixed_activations(tokens: Array, hidden: Array, layers: Array, k: MixedConstants) -> Array:
    """F2: 2*t*h*L bytes (activations with gradient checkpointing), t = b*s tokens."""
    return k.activation_bytes_per_token_hidden_layer * tokens * hidden * layers


def mixed_gradients(trainable: Array, mixed: Array, dtype_bytes: Array, k: MixedConstants) -> Array:
    """F2: 4 bytes per trainable parameter (the dtype's bytes when pure)."""
    return np.where(mixed == 1, k.gradient_bytes_per_param, dtype_bytes) * trainable


def mixed_optimizer(trainable: Array, optimizer_states: Array, k: MixedConstants) -> Array:
    """F2: SGD 4, SGD + momentum 8, Adam 12 bytes per trainable parameter."""
    per_param = np.select([optimizer_states == 0, optimizer_states == 1],
                          [k.sgd_bytes_per_param, k.momentum_bytes_per_param], k.adam_bytes_per_param)
    return per_param * trainable


def mixed(c: Columns, k: MixedConstants) -> Breakdown:
    """F2. Inference: P x bytes(dtype). Training: weights + activations + gradients + optimizer.

    The source writes mixed-precision training only; in pure precision we put the dtype's bytes in
    place of the 6 (weights) and 4 (gradients). Sharding is not part of the formula (the source's
    ZeRO-3 example is an unsharded total), so F2 ignores the parallel layout.
    """
    p = base_params(c)
    p_train = trainable_params(c)
    train = c.training == 1
    return Breakdown.of(
        c.layers,
        weights=np.where(train, mixed_weights(p + lora_params(c), c.mixed, c.dtype_bytes, k),
                         p * c.dtype_bytes),
        activations=c.training * mixed_activations(c.batch * c.seq, c.hidden, c.layers, k),
        gradients=c.training * mixed_gradients(p_train, c.mixed, c.dtype_bytes, k),
        optimizer=c.training * mixed_optimizer(p_train, c.optimizer_states, k),
    )


# --- F3 "activation per layer" (Korthikanti et al. 2022) -------------------------------------

@dataclass(frozen=True)
class KorthikantiConstants:
    replicated_sbh: float = 10.0
    """Per-layer sbh bytes not split by tensor parallelism (LayerNorms, QKV and MLP inputs)."""
    sharded_sbh: float = 24.0
    """Per-layer sbh bytes split by tensor parallelism; 10 + 24 = 34 without parallelism."""
    scores_as2b: float = 5.0
    """Per-layer a*s^2*b bytes of the attention core (scores, softmax, dropout mask)."""
    checkpoint_sbh: float = 2.0
    """Full recomputation: only the layer input, 2*sbh bytes, is kept."""
    weight_bytes_per_param: float = 2.0
    gradient_bytes_per_param: float = 2.0
    master_bytes_per_param: float = 4.0
    state_bytes: float = 4.0
    """Model states after Rajbhandari et al. 2020 (ZeRO): 2 + 2 + K bytes, K = 4 + 4 per state."""


def korthikanti_layer_activations(c: Columns, k: KorthikantiConstants) -> Array:
    """Bytes per layer (Korthikanti et al. 2022, eq. 1-6, with tensor parallel t):

    none:       sbh*(10 + 24/t + 5as/(ht));   + sequence parallel: sbh*(34 + 5as/h)/t
    selective:  sbh*(10 + 24/t);              + sequence parallel: 34*sbh/t
    full:       2*sbh                         (/t with sequence parallel)
    Written for 16-bit activations; scaled by (activation bytes / 2) for fp32 training.
    """
    sbh = c.seq * c.batch * c.hidden
    t = c.tp
    replicated = np.where(c.sequence_parallel == 1, k.replicated_sbh / t, k.replicated_sbh)
    linear = sbh * (replicated + k.sharded_sbh / t)
    scores = k.scores_as2b * c.heads * c.seq**2 * c.batch / t
    none = linear + scores
    selective = linear
    full = k.checkpoint_sbh * sbh / np.where(c.sequence_parallel == 1, t, 1.0)
    per_layer = np.select([c.recompute_full == 1, c.recompute_selective == 1], [full, selective], none)
    act_bytes = np.where(c.mixed == 1, 2.0, c.dtype_bytes)
    return per_layer * act_bytes / 2.0


def korthikanti(c: Columns, k: KorthikantiConstants) -> Breakdown:
    """F3: Korthikanti activations over all L layers (the first pipeline stage holds L/p layers of
    p micro-batches, so pipelining does not shrink it), plus ZeRO-paper model states sharded by
    tp*pp and by dp per ZeRO stage. Inference: weights and one layer's transient activations."""
    p = base_params(c) + lora_params(c)
    p_train = trainable_params(c)
    model_shards = c.tp * pipeline_shards(c)
    mixed_train = c.mixed == 1
    w = np.where(mixed_train, k.weight_bytes_per_param, c.dtype_bytes) * p
    g = np.where(mixed_train, k.gradient_bytes_per_param, c.dtype_bytes) * p_train
    states = c.optimizer_states * np.where(mixed_train, k.state_bytes, c.dtype_bytes)
    o = (np.where(mixed_train, k.master_bytes_per_param, 0.0) + states) * p_train
    w = w / model_shards / np.where(c.zero >= 3, c.dp, 1.0)
    g = c.training * g / model_shards / np.where(c.zero >= 2, c.dp, 1.0)
    o = c.training * o / model_shards / np.where(c.zero >= 1, c.dp, 1.0)
    layer = korthikanti_layer_activations(c, k)
    acts = np.where(c.training == 1, c.layers * layer, layer)
    return Breakdown.of(c.layers, weights=w, gradients=g, optimizer=o, activations=acts)


# --- F4 "parameter count + 4x rule" ----------------------------------------------------------

@dataclass(frozen=True)
class Rule4xConstants:
    layer_h2: float = 12.0
    """Per layer 12h^2: attention 4h^2, MLP 8h^2 (a 4h FFN)."""
    layer_h: float = 13.0
    """Per layer 13h: attention 4h, MLP 5h, two LayerNorms 4h."""
    adam_multiplier: float = 4.0
    """Training with Adam ~ 4 x weights (weights, gradients, two moments)."""
    sgd_multiplier: float = 3.0
    """The source's "SGD ~ 3x" (weights, gradients, momentum); used for both SGD variants."""


def rule4x_params(c: Columns, k: Rule4xConstants) -> Array:
    """F4: L*(12h^2 + 13h) + V*h (tied output embedding)."""
    return c.layers * (k.layer_h2 * c.hidden**2 + k.layer_h * c.hidden) + c.vocab * c.hidden


def rule4x_leading_params(c: Columns, k: Rule4xConstants) -> Array:
    """F4 for large h: 12*L*h^2."""
    return k.layer_h2 * c.layers * c.hidden**2


def rule4x(c: Columns, k: Rule4xConstants) -> Breakdown:
    """F4: weights = params x bytes(dtype); training ~ multiplier x trained weights; LoRA adds
    r*(d_in + d_out) trainable parameters per adapted matrix. No activations, no sharding."""
    w = rule4x_params(c, k) * c.dtype_bytes
    trained = np.where(c.lora == 1, lora_params(c), rule4x_params(c, k)) * c.dtype_bytes
    mult = np.where(c.optimizer_states == 2, k.adam_multiplier, k.sgd_multiplier)
    lora_w = c.lora * trained
    return Breakdown.of(c.layers, weights=w + lora_w, gradients=c.training * trained,
                        optimizer=c.training * (mult - 2.0) * trained)
