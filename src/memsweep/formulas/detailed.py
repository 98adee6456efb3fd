"""`detailed`: memsweep's own estimator, counting what the seed formulas miss.

It models a plain PyTorch training step (forward, cross-entropy, backward, `optimizer.step()`,
`zero_grad(set_to_none=True)`) or inference (prefill, then decode with a KV cache), per GPU, phase
by phase, and reports the breakdown at the phase with the largest total:

- forward end / backward start: weights + optimizer state + saved activations + logits (and the
  logits' gradient at the start of backward);
- optimizer step: weights + optimizer state + gradients + the foreach implementation's temporaries;
- inference: weights + KV cache (prompt + generated tokens) + one layer's prefill activations +
  last-token logits.

Precision follows PyTorch AMP: `mixed` keeps fp32 parameters, gradients and optimizer state, runs
matmuls in 16-bit under autocast (whose 16-bit weight copies are saved for backward) and keeps the
residual stream in fp32. `pure` keeps everything in the dtype. LoRA keeps the frozen base in the
16-bit dtype and the adapters in fp32 (mixed). Each term below is one function; docs/detailed.md
lists them with their derivations. Every per-term factor is a named constant for calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memsweep.columns import Array, Columns, base_params, lora_params, trainable_params
from memsweep.formulas.base import Breakdown

FP32 = 4.0


@dataclass(frozen=True)
class DetailedConstants:
    weights_factor: float = 1.0
    gradients_factor: float = 1.0
    optimizer_factor: float = 1.0
    activations_factor: float = 1.0
    logits_factor: float = 1.0
    kv_cache_factor: float = 1.0
    overhead_bytes: float = 0.0
    """A fixed per-GPU allowance (allocator fragmentation, workspaces); 0 until calibrated."""


# --- bytes per element --------------------------------------------------------------------

def compute_bytes(c: Columns) -> Array:
    """Activations: 16-bit under autocast; the dtype in pure mode; int8/int4 weights compute in 16-bit."""
    return np.where(c.mixed == 1, 2.0, np.maximum(c.dtype_bytes, 2.0))


def residual_bytes(c: Columns) -> Array:
    """The residual stream: fp32 under autocast (fp32 embeddings + 16-bit outputs promote), else dtype."""
    return np.where(c.mixed == 1, FP32, compute_bytes(c))


def trainable_bytes(c: Columns) -> Array:
    """Trainable parameters, their gradients and optimizer states: fp32 when mixed, else the dtype."""
    return np.where(c.mixed == 1, FP32, c.dtype_bytes)


# --- sharding -------------------------------------------------------------------------------

def model_shards(c: Columns) -> Array:
    """Weights, gradients and states are split over tensor and pipeline ranks."""
    return c.tp * c.pp


def zero_shards(c: Columns, stage: int) -> Array:
    """ZeRO (Rajbhandari et al. 2020): stage 1 shards optimizer state, 2 gradients, 3 weights."""
    return np.where(c.zero >= stage, c.dp, 1.0)


# --- model state terms ----------------------------------------------------------------------

def weights_bytes(c: Columns) -> Array:
    """Trained params in `trainable_bytes`; a frozen LoRA base and inference weights in the dtype."""
    p, p_lora = base_params(c), lora_params(c)
    full_train = (c.training == 1) & (c.lora == 0)
    stored = np.where(full_train, p * trainable_bytes(c), p * c.dtype_bytes + p_lora * trainable_bytes(c))
    return stored / model_shards(c) / zero_shards(c, 3)


def gradients_bytes(c: Columns) -> Array:
    """One gradient per trainable parameter, in the parameter's dtype."""
    return c.training * trainable_params(c) * trainable_bytes(c) / model_shards(c) / zero_shards(c, 2)


def optimizer_bytes(c: Columns) -> Array:
    """Adam: m and v; SGD with momentum: one buffer; plain SGD: none."""
    states = c.optimizer_states * trainable_params(c) * trainable_bytes(c)
    return c.training * states / model_shards(c) / zero_shards(c, 1)


def optimizer_step_temporary_bytes(c: Columns) -> Array:
    """foreach step: about one extra parameter-sized buffer for the update (PyTorch _foreach ops)."""
    temp = c.foreach * np.minimum(c.optimizer_states, 1.0) * trainable_params(c) * trainable_bytes(c)
    return c.training * temp / model_shards(c) / zero_shards(c, 1)


# --- activation terms (bytes per token per layer, then totals) ------------------------------

def norm_inputs_per_token(c: Columns) -> Array:
    """Two norms per layer each save their input in the residual dtype (+ an fp32 statistic)."""
    return 2 * (c.hidden * residual_bytes(c) + FP32 * (1 + c.norm_bias))


def linear_inputs_per_token(c: Columns) -> Array:
    """The normed inputs of the QKV and of the MLP projections (h each), and Q, K, V themselves."""
    cb = compute_bytes(c)
    kv = np.where(c.eager_attention == 1, c.heads, c.kv_heads)  # eager repeats K/V to all heads
    return cb * (2 * c.hidden + c.heads * c.head_dim + 2 * kv * c.head_dim)


def attention_core_per_token(c: Columns) -> Array:
    """Eager: softmax probabilities a*s; sdpa/flash: log-sum-exp a (fp32). Plus the O input a*d."""
    cb = compute_bytes(c)
    core = np.where(c.eager_attention == 1, c.heads * c.seq * cb, c.heads * FP32)
    return core * (1 - c.recompute_selective) + c.heads * c.head_dim * cb


def mlp_per_token(c: Columns) -> Array:
    """SwiGLU saves gate, up, act(gate) and their product (4f); GELU its input and output (2f)."""
    return compute_bytes(c) * c.ffn * np.where(c.gated_mlp == 1, 4.0, 2.0)


def layer_activations_per_token(c: Columns) -> Array:
    """All of one layer's saved tensors per token; tensor parallel splits all but the norm inputs
    (sequence parallel splits those too), after Korthikanti et al. 2022."""
    sharded = (linear_inputs_per_token(c) + attention_core_per_token(c) + mlp_per_token(c)) / c.tp
    replicated = norm_inputs_per_token(c) / np.where(c.sequence_parallel == 1, c.tp, 1.0)
    return sharded + replicated


def autocast_weight_copies_bytes(c: Columns) -> Array:
    """Mixed full training: autocast's 16-bit copies of the weights are saved for backward."""
    full_train = (c.training == 1) & (c.lora == 0)
    return np.where(full_train & (c.mixed == 1), 2.0 * base_params(c), 0.0) / model_shards(c) / zero_shards(c, 3)


def saved_activations_bytes(c: Columns) -> Array:
    """End of forward. none/selective: every layer's saved tensors. full: each layer's input only,
    plus one layer recomputed during backward."""
    tokens = c.batch * c.seq
    per_layer = tokens * layer_activations_per_token(c)
    checkpoints = tokens * c.hidden * residual_bytes(c)
    # Pipelining does not shrink this: under 1F1B the first stage holds pp micro-batches of L/pp layers.
    saved = np.where(c.recompute_full == 1, c.layers * checkpoints + per_layer, c.layers * per_layer)
    return saved + autocast_weight_copies_bytes(c)


def prefill_activations_bytes(c: Columns) -> Array:
    """Inference: no autograd, so about one layer's tensors are alive at once (plus eager scores)."""
    tokens = c.batch * c.seq
    return tokens * layer_activations_per_token(c)


def logits_bytes(c: Columns) -> Array:
    """Training: b*s*V logits in the compute dtype plus their fp32 log-softmax for the loss.
    Inference: a decoder keeps last-token fp32 logits; an encoder (bert) all b*s*V."""
    cb = compute_bytes(c)
    train = c.batch * c.seq * c.vocab * (cb + FP32)
    decoder = c.final_norm == 1
    infer = np.where(decoder, c.batch * c.vocab * FP32, c.batch * c.seq * c.vocab * cb)
    return np.where(c.training == 1, train, infer) / c.tp


def logits_gradient_bytes(c: Columns) -> Array:
    """Start of backward: the fp32 gradient of the log-softmax, b*s*V."""
    return c.training * c.batch * c.seq * c.vocab * FP32 / c.tp


def kv_cache_bytes(c: Columns) -> Array:
    """Decoder inference: K and V for every layer, kv_heads*d per token, prompt + generated tokens."""
    decoder_inference = (c.training == 0) & (c.final_norm == 1)
    tokens = c.batch * (c.seq + c.gen_tokens)
    kv = 2 * c.layers * c.kv_heads * c.head_dim * tokens * compute_bytes(c) / c.tp / c.pp
    return np.where(decoder_inference, kv, 0.0)


# --- phases -----------------------------------------------------------------------------------

def detailed(c: Columns, k: DetailedConstants) -> Breakdown:
    """Peak over phases; the breakdown reported is the one of the peak phase."""
    w = k.weights_factor * weights_bytes(c)
    o = k.optimizer_factor * optimizer_bytes(c)
    g = k.gradients_factor * gradients_bytes(c)
    overhead = np.full_like(w, k.overhead_bytes)
    train = c.training == 1
    acts = k.activations_factor * np.where(train, saved_activations_bytes(c), prefill_activations_bytes(c))
    logits = k.logits_factor * (logits_bytes(c) + logits_gradient_bytes(c))
    forward_backward = Breakdown.of(w, weights=w, optimizer=o, activations=acts, logits=logits,
                                    kv_cache=k.kv_cache_factor * kv_cache_bytes(c), overhead=overhead)
    step = Breakdown.of(w, weights=w, optimizer=o + k.optimizer_factor * optimizer_step_temporary_bytes(c),
                        gradients=g, overhead=overhead)
    return forward_backward.select(forward_backward.total >= step.total, step)
