"""`detailed`: memsweep's own estimator, counting what the seed formulas miss, phase by phase.

It models the plain PyTorch step the measurement backends run (forward, cross-entropy on fp32
logits, backward, `optimizer.step()`, `zero_grad(set_to_none=True)`; or prefill + decode with a
KV cache), per GPU, as the largest of a few *moments*, each a sum of named terms:

- forward end (inside the loss):  weights + optimizer state + saved activations + live logits
- backward start:                 weights + optimizer state + saved activations + logits gradients
- full recompute, in backward:    weights + optimizer state + checkpoints + one recomputed layer
                                  + that layer's gradients
- end of backward:                weights + optimizer state + gradients
- optimizer step:                 weights + optimizer state + gradients + step temporaries
                                  (their own term, `optimizer_step`)
- prefill / decode (inference):   weights + KV cache + the live tensors of one layer

The breakdown reported is the one of the winning moment, and `peak_phase` names it (PHASES: the
`peak_phase` result column). Model-state terms are exact parameter
arithmetic. The saved activations are bytes per structural term (L*t*h, L*t*f, t*V, ...) taken
from `coefficients.py`, which `scripts/derive_coefficients.py` derives exactly from the reference
implementation; docs/formulas.md explains each. Every per-term factor is a named constant so a
calibration can refit it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np

from memsweep.columns import (
    FAMILY_CODES, Array, Columns, attention_params, base_params, embedding_params, in_flight_layers, layer_norm_params,
    lora_params, mlp_matrices, mlp_params, norm_params, pipeline_shards, routed_expert_params, trainable_params,
)
from memsweep.formulas.base import Breakdown
from memsweep.formulas.basis import (
    BASIS, EXT_BASIS, EXT_CLASSES, autocast_elements, basis_values, ext_basis_values, ext_class, moe_padding,
    newer_architecture,
)
from memsweep.formulas.basis import layer_params as block_matrices
from memsweep.formulas.coefficients import BASIS as FITTED_BASIS
from memsweep.formulas.coefficients import COEFFICIENTS
import memsweep.formulas.techniques as tq
from memsweep.formulas.sac import sac_total_bytes
from memsweep.sdpa_rules import KERNELS, Call, choose

FP32 = 4.0
if FITTED_BASIS != BASIS:
    if not os.environ.get("MEMSWEEP_DERIVING"):  # set by the derive scripts, which refit them
        raise RuntimeError("formulas/coefficients.py was fitted on another basis: run scripts/derive_coefficients.py")
    COEFFICIENTS = {k: tuple(dict(zip(FITTED_BASIS, v)).get(n, 0.0) for n in BASIS) for k, v in COEFFICIENTS.items()}
try:
    from memsweep.formulas.coefficients_ext import EXT_BASIS as FITTED_EXT_BASIS
    from memsweep.formulas.coefficients_ext import EXT_COEFFICIENTS as _FITTED_EXT
except ImportError:  # not derived yet: the newer architectures' terms count nothing
    FITTED_EXT_BASIS, _FITTED_EXT = EXT_BASIS, {}
# By term name, so a table fitted before a term was added reads 0 for it (scripts/derive_architectures.py
# refits; tests/test_architectures.py checks the shipped table is fitted on the current basis).
EXT_COEFFICIENTS = {key: tuple(dict(zip(FITTED_EXT_BASIS, coef)).get(n, 0.0) for n in EXT_BASIS)
                    for key, coef in _FITTED_EXT.items()}
FAMILIES = ("gpt2", "llama", "bert")
PRECISIONS = ("mixed", "pure16", "fp32", "kbit", "kbit16")
"""How activations are stored: autocast (AMP), pure 16-bit, fp32, and QLoRA after peft's
prepare_model_for_kbit_training (fp32 hidden states around a bitsandbytes base) with and without
autocast."""
KBIT_PRECISIONS = ("kbit", "kbit16")
KBIT_FALLBACK = {"kbit": "mixed", "kbit16": "pure16"}
"""The newer architectures' extra terms (EXT_COEFFICIENTS) of a k-bit-prepared base are read from
the same precision without it (an approximation: those terms were not fitted with fp32 hidden states)."""


@dataclass(frozen=True)
class DetailedConstants:
    weights_factor: float = 1.0
    gradients_factor: float = 1.0
    optimizer_factor: float = 1.0
    optimizer_step_factor: float = 1.0
    """Scales `optimizer_step_temporary_bytes` (the `optimizer_step` term); the states are `optimizer_factor`'s."""
    activations_factor: float = 1.0
    logits_factor: float = 1.0
    kv_cache_factor: float = 1.0
    overhead_bytes: float = 0.0
    """A fixed per-GPU allowance (allocator rounding, workspaces); 0 until calibrated."""


# --- bytes per element ------------------------------------------------------------------------

def compute_bytes(c: Columns) -> Array:
    """Activations: 16-bit under autocast; the dtype in pure mode; int8/int4 weights compute in 16-bit."""
    return np.where(c.mixed == 1, 2.0, np.maximum(c.dtype_bytes, 2.0))


def linear_out_bytes(c: Columns) -> Array:
    """The element of a block matmul's output: the compute dtype's, but fp32 around a k-bit-prepared
    bitsandbytes base, whose layers cast their output back to the fp32 hidden states' dtype
    (`Linear4bit.forward`: `out.to(inp_dtype)`), so a block's q/k/v and MLP intermediates are fp32."""
    return np.where(c.kbit == 1, FP32, compute_bytes(c))


def plain_matmul_bytes(c: Columns) -> Array:
    """The element a matmul outside the quantized layers makes (attention scores and
    probabilities, the LM head's logits): the compute dtype's (autocast multiplies in 16 bits), but
    fp32 for a k-bit-prepared base without autocast (fp32 q and k, an fp32 head)."""
    return np.where((c.kbit == 1) & ~autocast(c), FP32, compute_bytes(c))


def trainable_bytes(c: Columns) -> Array:
    """Trainable parameters, their gradients and optimizer states: fp32 when mixed, else the dtype."""
    return np.where(c.mixed == 1, FP32, c.dtype_bytes)


def precision_class(c: Columns) -> Array:
    """0 mixed (AMP), 1 pure 16-bit, 2 fp32, 3 / 4 a k-bit-prepared QLoRA base under autocast / in
    pure 16-bit (`c.kbit`): the ways activations are stored (PRECISIONS)."""
    plain = np.where(autocast(c), 0, np.where(compute_bytes(c) >= FP32, 2, 1))
    return np.where(c.kbit == 1, np.where(autocast(c), 3, 4), plain)


def autocast(c: Columns) -> Array:
    """Mixed precision by autocast (PyTorch AMP): fp32 parameters cast per layer, the casts saved.
    Under `mixed_policy=param_dtype` (FSDP2, DeepSpeed bf16) a layer computes with 16-bit
    parameters and its activations are a pure 16-bit model's."""
    return (c.mixed == 1) & (c.param_policy == 0)


# --- sharding -------------------------------------------------------------------------------

def model_shards(c: Columns) -> Array:
    """Weights, gradients and states are split over tensor and pipeline ranks (the largest
    pipeline stage's share when pp does not divide the layers: `pipeline_shards`)."""
    return c.tp * pipeline_shards(c)


def zero_shards(c: Columns, stage: int) -> Array:
    """ZeRO (Rajbhandari et al. 2020): stage 1 shards optimizer state, 2 gradients, 3 weights."""
    return np.where(c.zero >= stage, c.dp, 1.0)


# --- model state terms ----------------------------------------------------------------------

def updated_params(c: Columns) -> Array:
    """Parameters that receive a gradient: the trainable ones, less bert's pooler, which the
    masked-LM loss never reaches (so it gets neither a gradient nor optimizer state)."""
    pooler = c.pooler * (c.hidden * c.hidden + c.hidden) * (c.lora == 0)
    return c.training * (trainable_params(c) - pooler)


def expert_fraction(c: Columns) -> Array:
    """Share of the parameters that are routed experts (what expert parallelism splits)."""
    return routed_expert_params(c) / base_params(c)


def per_gpu(c: Columns, n: Array, stage: int) -> Array:
    """`n` (parameters, or bytes spread like them) per GPU: split over tensor and pipeline ranks;
    the routed experts' share also over `ep` ranks; ZeRO at `stage` splits the rest over the dp
    ranks and the experts over the dp / ep ranks that hold the same experts (DeepSpeed-MoE)."""
    f = expert_fraction(c)
    dense = (1 - f) * n / zero_shards(c, stage)
    experts = f * n / c.ep / np.where(c.zero >= stage, c.dp / c.ep, 1.0)
    return (dense + experts) / model_shards(c)


def weights_bytes(c: Columns) -> Array:
    """Full training: parameters in `trainable_bytes` (fp32 under AMP). LoRA: a frozen base in the
    dtype + adapters in `trainable_bytes`. Inference: the dtype (int8 1, int4 0.5 bytes)."""
    p, p_lora = base_params(c), lora_params(c)
    full_train = (c.training == 1) & (c.lora == 0)
    # a quantized base (QLoRA, GPTQ / AWQ / int8 inference) keeps its other parameters 16-bit;
    # peft's prepare_model_for_kbit_training casts them to fp32 (`kbit`)
    other = np.where(c.kbit == 1, FP32, np.where(tq.quantized(c), compute_bytes(c), c.dtype_bytes))
    frozen = tq.frozen_base_bytes(c, other)
    # with 16-bit compute parameters (mixed_policy=param_dtype, offload) the fp32 master is the
    # optimizer's (`master_bytes`)
    # (FSDP2's shards are fp32: the master itself)
    trained = np.where(fsdp(c), trainable_bytes(c), gathered_element_bytes(c))
    stored = np.where(full_train, p * trained, frozen + p_lora * trained)
    # parameters offloaded to the CPU: only the layers being gathered are on the GPU; FSDP2
    # shards every parameter at rest from ZeRO-2 on (its ZeRO-2 differs in the forward only)
    sharded = np.where(fsdp(c), per_gpu(c, stored, 2), per_gpu(c, stored, 3))
    return np.where(c.offload_params == 1, tq.gathered_bytes(c, compute_bytes(c)), sharded)


def master_bytes(c: Columns) -> Array:
    """Mixed precision with 16-bit compute parameters keeps an fp32 master of each trained one
    beside the optimizer states (DeepSpeed's `fp32_partitioned_groups`, FSDP2's fp32 shards)."""
    return np.where((c.param_policy == 1) & ~fsdp(c), per_gpu(c, updated_params(c) * FP32, 1), 0.0)


def gathered_layer_bytes(c: Columns) -> Array:
    """DeepSpeed's ZeRO-3 in the forward and backward: the layer running and the one prefetched
    are whole (all-gathered), in the dtype they compute with (fp32 under autocast, whose casts the
    tables count; 16-bit with param_dtype). FSDP2's moments: `fsdp_gathered`."""
    on = (c.training == 1) & (c.zero >= 3) & (c.dp > 1) & (c.offload_params == 0) & (c.deepspeed == 1)
    if not on.any():
        return np.zeros(len(c))
    root, block = gather_units(c)[:2]
    return np.where(on, (root + 2.0 * block) / c.tp, 0.0)


def gathered_element_bytes(c: Columns) -> Array:
    """A trained parameter as ZeRO-3 / FSDP2 gathers it and its gradient is made: in its own dtype
    (fp32 under autocast), or the 16-bit compute dtype with mixed_policy=param_dtype."""
    return np.where(c.param_policy == 1, compute_bytes(c), trainable_bytes(c))


def reduce_element_bytes(c: Columns) -> Array:
    """A gradient as the reduce-scatter takes it: fp32 with param_dtype (`reduce_dtype=float32`,
    torchtitan's setting), else as it was made."""
    return np.where(c.param_policy == 1, FP32, gathered_element_bytes(c))


def fsdp(c: Columns) -> Array:
    """Training sharded by torch's FSDP2 (`parallel.stack=fsdp`, ZeRO-2 or 3 over dp > 1 ranks)."""
    return (c.training == 1) & (c.zero >= 2) & (c.dp > 1) & (c.offload_params == 0) & (c.deepspeed == 0)


def fsdp_units(c: Columns, on: Array) -> tuple[Array, Array, Array, Array]:
    """`gather_units` on FSDP2's rows `on` (per tensor rank), zeros elsewhere (at once when no row
    is: the planner's single-GPU rows pay nothing)."""
    if not on.any():
        return (np.zeros(len(c)),) * 4
    return tuple(np.where(on, x / c.tp, 0.0) for x in gather_units(c))


def gather_units(c: Columns) -> tuple[Array, Array, Array, Array]:
    """(root, block, block gradients, reduce-scatter input): what ZeRO-3 all-gathers for the root
    module and for one block, in the dtype it gathers them (each parameter's own: fp32 under autocast, the 16-bit
    `MixedPrecisionPolicy.param_dtype` with mixed_policy=param_dtype; a LoRA base in its stored
    format, a 4-bit base as its packed bytes, as torchao's NF4Tensor and bitsandbytes with
    `bnb_4bit_quant_storage` shard it), and one block's gradients as the backward makes them and
    as the reduce-scatter takes them (fp32 with param_dtype: `reduce_dtype=float32`, as torchtitan
    sets it)."""
    gather = gathered_element_bytes(c)
    root_p = tq.root_params(c)
    full = c.lora == 0
    other = np.where(c.kbit == 1, FP32, np.where(tq.quantized(c), compute_bytes(c), c.dtype_bytes))
    frozen_blocks = tq.frozen_base_bytes(c, other) - root_p * other
    adapters = lora_params(c) / c.layers
    block = np.where(full, (base_params(c) - root_p) / c.layers * gather, frozen_blocks / c.layers + adapters * gather)
    root = root_p * np.where(full, gather, other)
    trained = np.where(full, (base_params(c) - root_p) / c.layers, adapters)
    return root, block, trained * gather, trained * reduce_element_bytes(c)


def fsdp_root_gradients(c: Columns, on: Array) -> tuple[Array, Array, Array]:
    """The root's gradients on FSDP2's rows `on`: (the head's, alive unsharded from the head's
    backward to the end of the step, tied: its share of the embedding's; every root gradient at
    its post-backward; their reduce-scatter input, both alive at the copy)."""
    trained = tq.root_params(c) * (c.lora == 0) * on / c.tp
    head = c.vocab * c.hidden * (c.lora == 0) * on / c.tp
    gather = gathered_element_bytes(c)
    return head * gather, trained * gather, trained * reduce_element_bytes(c)


def fsdp_backward_saved(c: Columns, saved: Array) -> Array:
    """Saved activations once the head's backward is done: the loss's slot and, under autocast, the
    head's 16-bit weight cast freed (each block's backward then uses its share, the saved set over
    the layers)."""
    cast = (autocast(c) | (c.param_policy == 1)) & (c.lora == 0) & (c.fused_loss == 0)
    return saved - loss_slot_bytes(c) - cast * 2.0 * c.vocab * c.hidden / c.tp


def fsdp_gathered(c: Columns, units: tuple[Array, Array, Array, Array]) -> dict[str, Array]:
    """FSDP2's unsharded parameters and communication buffers at each moment of a training step
    (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py, torch 2.13), beside the sharded
    state. Every all-gather writes a flat output (the group's bytes), copied out into the
    unsharded parameters; in the forward the previous group's output is freed only after the
    next group's copy-out (`wait_for_unshard`, implicit prefetch), in the backward right after
    its own. The root (embeddings, head) is gathered first, and under FSDP2's default for the
    root (`reshard_after_forward` unset) stays so to the end of the backward. ZeRO-3
    (`reshard_after_forward=True`) frees a block's parameters after its forward and gathers them
    again before its backward, prefetching the next block's (`_backward_prefetch`); ZeRO-2
    (False) keeps every block gathered from its forward to its backward. A block's gradients are
    copied into one reduce-scatter input, kept until the next block's reduce-scatter is issued
    (`reduce_scatter_max_input_buffers=1`).

    forward_start: the root's output and parameters with the first block's (2 root + 2 block);
    forward_block: the last block's copy-out (root + previous, own output + own parameters;
    ZeRO-2: every earlier block too); loss: the end of the forward and the logits' gradient, the
    root (ZeRO-2: every block); head: the root's backward, + the last block's prefetched output
    (ZeRO-2: every block, nothing to prefetch); last_block: the last block's backward, the first
    (its parameters and the next one's prefetch; ZeRO-2: every block); block: one block further
    (ZeRO-2: one block fewer gathered), with the last block's reduce-scatter input; first_block:
    the first block's backward (nothing left to prefetch); end: the embedding's backward, the root
    gathered beside the first block's reduce-scatter input (its own, at its post-backward:
    `fsdp_root_gradients`)."""
    root, block, _, reduce = units
    z2 = (c.zero == 2) * c.layers * block  # ZeRO-2: every block's parameters, gathered once
    zero2 = c.zero == 2
    return {"forward_start": 2.0 * root + 2.0 * block,
            "forward_block": root + 3.0 * block + np.maximum(z2 - block, 0.0),
            "loss": root + z2,
            "head": root + np.where(zero2, z2, block),
            "last_block": root + np.where(zero2, z2, 2.0 * block),
            "block": root + np.where(zero2, z2 - block, 2.0 * block) + reduce,
            "first_block": root + block + reduce,
            "end": root + reduce}


def ddp(c: Columns) -> Array:
    """Training replicated by torch's DistributedDataParallel (`parallel.stack=fsdp`, ZeRO-0 or 1
    over dp > 1 ranks): ZeRO-1 adds torch's ZeroRedundancyOptimizer."""
    return ((c.training == 1) & (c.zero < 2) & (c.dp > 1) & (c.deepspeed == 0)
            & (c.offload_params == 0) & (c.offload_optimizer == 0))


def ddp_bucket_bytes(c: Columns) -> Array:
    """DDP's gradient buckets: flat buffers covering every parameter that trains, in its dtype,
    allocated when DDP wraps the model and kept for the run (25 MiB each; with DDP's default
    `gradient_as_bucket_view=False` beside the gradients, each gradient copied in as it is made:
    "the saved memory size will be equal to the total gradients size" with True, DDP's docs)."""
    return np.where(ddp(c), per_gpu(c, updated_params(c) * trainable_bytes(c), 2), 0.0)


def rank_share(c: Columns, n: Array) -> Array:
    """`n` bytes spread like the updated parameters' optimizer states, on the largest rank: ZeRO-1
    splits them over dp (`per_gpu`); torch's ZeroRedundancyOptimizer assigns whole parameters,
    largest first to the least-loaded rank, so rank 0 holds at least the largest one's (the
    embedding in full training, when it outweighs an even share: a few-layer model)."""
    even = per_gpu(c, n, 1)
    whole = ddp(c) & (c.zero == 1)
    if not whole.any():
        return even
    largest = tq.largest_trainable(c) * n / np.maximum(updated_params(c), 1.0) / c.pp
    return np.where(whole, np.maximum(even, largest), even)


def gradients_bytes(c: Columns) -> Array:
    """One gradient per updated parameter, in the parameter's dtype (in CPU RAM when the optimizer
    is offloaded: each is copied there as it is reduced)."""
    return np.where(c.offload_optimizer == 1, 0.0, per_gpu(c, updated_params(c) * trainable_bytes(c), 2))


def optimizer_bytes(c: Columns) -> Array:
    """Adam: m and v; SGD with momentum: one buffer; plain SGD: none (per updated parameter), in
    the trainable dtype. 8-bit AdamW, Lion and Adafactor: their own layouts (techniques.py)."""
    # offloaded: the states (and the master weights) are in CPU RAM (`cpu_bytes`)
    return np.where(c.offload_optimizer == 1, 0.0, rank_share(c, state_bytes(c)) + master_bytes(c))


def state_bytes(c: Columns) -> Array:
    """Every optimizer state before sharding, wherever it lives (GPU, or CPU when offloaded)."""
    updated, tb = updated_params(c), trainable_bytes(c)
    return np.where(tq.beyond_torch_optim(c), tq.technique_state_bytes(c, updated, tb),
                    c.optimizer_states * updated * tb)


def cpu_bytes(c: Columns) -> Array:
    """CPU RAM a rank needs for what it offloads (DeepSpeed's estimators count the same parts:
    `estimate_zero2_model_states_mem_needs`, `..._zero3_...`): the optimizer states, the fp32
    master weights and fp32 gradients (offload.optimizer); the 16-bit parameters (offload.params);
    the checkpoints (offload.activations)."""
    updated = updated_params(c)
    master = np.where(c.mixed == 1, updated * FP32, 0.0)
    optimizer = per_gpu(c, state_bytes(c) + master + updated * trainable_bytes(c), 1) * c.offload_optimizer
    params = c.offload_params * per_gpu(c, base_params(c) * compute_bytes(c), 3)
    return c.training * (optimizer + params) + offloaded_checkpoint_bytes(c)


def _adam(c: Columns) -> Array:
    return (c.optimizer_states == 2) & (c.opt_8bit == 0)


def optimizer_step_temporary_bytes(c: Columns) -> Array:
    """foreach Adam: `_foreach_sqrt(exp_avg_sq)` materialises one updated-parameter-sized list;
    for-loop Adam: two temporaries of the largest parameter (the embedding, V x h); fused (and
    bitsandbytes' kernels): none; Adafactor: fp32 copies of the largest parameter (techniques.py).
    Stepped in the backward, one parameter at a time: `in_backward_bytes`."""
    foreach = rank_share(c, updated_params(c) * trainable_bytes(c))
    largest = np.where(c.lora == 1, 0.0, 2.0 * c.vocab * c.hidden * trainable_bytes(c) / c.tp)
    steps = np.where(_adam(c), np.where(c.foreach == 1, foreach, largest), 0.0) + tq.adafactor_step_bytes(c, trainable_bytes(c))
    return c.training * (1 - c.in_backward) * steps


def _step_temporaries(c: Columns, elements: Array) -> Array:
    """One parameter's step temporaries when it is stepped alone (`optimizer.in_backward`): foreach
    Adam one copy, for-loop two, fused and bitsandbytes none, Adafactor its fp32 tensors."""
    tb = trainable_bytes(c)
    adam = np.where(_adam(c), np.where(c.foreach == 1, 1.0, 2.0), 0.0) * elements * tb
    ada = np.where(c.opt_adafactor == 1, np.where(tb < FP32, tq.ADAFACTOR_STEP_TENSORS[16],
                                                  tq.ADAFACTOR_STEP_TENSORS[32]) * elements * FP32, 0.0)
    return adam + ada


def in_backward_bytes(c: Columns) -> Array:
    """`optimizer.in_backward` (torchtune's optimizer_in_bwd), inside a block's backward: each
    parameter is stepped in its post-accumulate-grad hook and its gradient freed, so no gradient
    set exists; a block matrix's gradient and its step temporaries are alive at once."""
    n = np.where(c.lora == 1, tq.largest_trainable(c), tq.largest_matrix(c))
    # a tied embedding's gradient from the head waits in autograd's buffer for the embedding's
    # own, at the end of the backward: it is alive through every block's backward (Liger's fused
    # loss made it in the forward: among its saved tensors, `fused_loss_saved_bytes`)
    tied = (c.lora == 0) * c.tied_embeddings * (1 - c.fused_loss) * c.vocab * c.hidden * trainable_bytes(c) / c.tp
    return c.training * c.in_backward * (n * trainable_bytes(c) + _step_temporaries(c, n) + tied)


def embedding_end_bytes(c: Columns, gradients: Array, inputs: Array) -> tuple[Array, Array]:
    """(gradients, activations) at the end of a full backward, the input embedding's backward,
    with every other gradient made. Untied: the embedding's dense V*h gradient is written
    (`embedding_dense_backward`) from its output's gradient (t*h in the hidden states' dtype) and
    the int64 ids, still alive; accumulating, the new V*h is added into the one the previous
    micro-batch left (AccumulateGrad's in-place sum), so both are alive. Stepped in the backward,
    no gradient set exists and the per-parameter moments cover it. Tied (the head is the
    embedding): the head's share of the shared weight's gradient has waited in autograd's buffer
    since the head's backward, the embedding's backward makes its own, and autograd sums the two
    out of place: two V*h beside G, three accumulating or stepped in the backward. It is the
    backward's peak whenever a layer's gradients outweigh its saved activations and the step's
    states and temporaries are small (8-bit AdamW, Lion, SGD): mistral-nemo-12b's backward was 14 %
    low without it, BERT's (tied, no final norm) 34 %."""
    vh = c.vocab * c.hidden * trainable_bytes(c) / c.tp
    full = (c.training == 1) & (c.lora == 0)
    tied = full & (c.tied_embeddings == 1)
    untied = full & (c.tied_embeddings == 0) & (c.in_backward == 0) & (c.offload_optimizer == 0)
    accumulating = c.grad_accum > 1
    tied_extra = np.where((c.in_backward == 1) | accumulating, 3.0, 2.0) * vh
    grads = np.select([tied, untied], [gradients + tied_extra, gradients + accumulating * vh], default=0.0)
    out_grad = c.batch * c.seq * c.hidden * hidden_bytes(c) / c.tp
    return grads, np.where(untied, out_grad + inputs, 0.0)


def offloaded_checkpoint_bytes(c: Columns, block: tuple[Array, ...] | None = None) -> Array:
    """torchtune's activation offloading under full recompute: the checkpoints go to pinned CPU
    memory as they are made and come back one layer ahead of the backward; the GPU holds about two
    (the one in use and the one in flight)."""
    checkpoints = (block or _recompute_block(c))[1]
    on = (c.offload_activations == 1) & (c.recompute_full == 1) & (c.training == 1)
    return np.where(on, checkpoints * np.maximum(c.layers - 2.0, 0.0) / c.layers, 0.0)


def head_backward_bytes(c: Columns, saved: Array) -> tuple[tuple[Array, Array], ...]:
    """(activations, gradients) at three moments of the LM head's backward, when it trains: what is
    saved but the freed log-softmax, then
    - during its matmul's backward: the 16-bit logits' gradient and the new weight gradient (in the
      dtype the head multiplied by: the 16-bit cast under autocast). torchtune's chunked output runs
      it once per chunk: autograd sums the chunks' weight gradients out of place (old, new and sum:
      3 x V*h; 2 when an untied 16-bit head accumulates into .grad in place) while the later
      chunks' logits gradients wait;
    - after it, under autocast: the cast's gradient converted to the fp32 one (2 + 4 bytes per
      weight) while the cast itself, saved for this backward, is freed;
    - stepped in the backward (`optimizer.in_backward`), once .grad holds it: an untied head's
      gradient and its step temporaries (a tied one steps at the end).
    Liger's fused loss made these gradients in the forward: no such moments."""
    t_v = c.batch * c.seq * c.vocab
    cb, tb = compute_bytes(c), trainable_bytes(c)
    vh = c.vocab * c.hidden / c.tp
    n = np.maximum(c.loss_chunks, 1.0)
    chunked = n > 1
    cast = autocast(c) | (c.param_policy == 1)  # the head multiplied by a 16-bit copy
    g16 = np.where(cast, 2.0, tb)
    sums = np.where((c.tied_embeddings == 1) | cast, 3.0, 2.0)
    on = (c.training == 1) & (c.lora == 0) & (c.fused_loss == 0) & (c.final_norm == 1)
    base = saved - loss_slot_bytes(c)
    during = (base + np.where(chunked, (n - 1) / n, 1.0) * t_v * cb, np.where(chunked, sums, 1.0) * vh * g16)
    after = (base - cast * vh * 2.0, np.where(cast, vh * (2.0 + FP32), vh * tb))
    steps = c.in_backward * (1 - c.tied_embeddings) * _step_temporaries(c, vh)
    stepped = (base - cast * vh * 2.0, vh * tb + steps)  # the hook steps it once .grad holds it
    return tuple((np.where(on, a, 0.0), np.where(on, g, 0.0)) for a, g in (during, after, stepped))


# --- activation terms -------------------------------------------------------------------------

WORKLOAD_TABLES = ("train", "lora-qv", "lora-qkvo", "lora-mlp", "lora-all")
"""Full training, and LoRA with adapters on q+v, q+k+v+o, the MLP (gate+up+down), or every matrix."""


ATTENTION_TABLES = ("sdpa", "eager")


def _coefficients(fam: str, prec: str, wl: str, rc: str, att: str, quantity: str) -> tuple[float, ...]:
    """The exact fit where there is one. Two documented approximations where there is none:
    mixed LoRA = pure 16-bit LoRA + autocast's 16-bit adapter copies and a 16-bit copy of each
    adapted matrix's input (peft's cast, measure/models.py LoRALinear); an eager table missing
    (MLP-only LoRA, whose first layer keeps no attention at all) = the sdpa table without the
    log-sum-exp, plus the probabilities and the causal mask of every layer."""
    coef = COEFFICIENTS.get(f"{fam}/{prec}/{wl}/{rc}/{att}/{quantity}")
    if coef is not None:
        return coef
    if prec in KBIT_PRECISIONS and (wl == "train" or os.environ.get("MEMSWEEP_DERIVING")):
        return (0.0,) * len(BASIS)  # a k-bit base is LoRA's only: no full-training table
    if att == "sdpa" and not (prec == "mixed" and wl.startswith("lora")):  # nothing to start from
        if os.environ.get("MEMSWEEP_DERIVING"):
            return (0.0,) * len(BASIS)
        raise RuntimeError(f"formulas/coefficients.py has no fit for {fam}/{prec}/{wl}/{rc}/sdpa: "
                           "run scripts/derive_coefficients.py")
    terms = dict(zip(BASIS, _coefficients(
        fam, "pure16", wl, rc, att, quantity) if prec == "mixed" and wl.startswith("lora") else _coefficients(
        fam, prec, wl, rc, "sdpa", quantity)))
    if prec == "mixed" and wl.startswith("lora"):
        terms["Llora"] += 2.0
        # peft casts each adapted matrix's input to the fp32 adapters' dtype and autocast casts
        # that back to 16 bits for lora_A, which saves it: one 16-bit copy per target and layer
        inputs = {"qv": ("h", "h"), "qkvo": ("h",) * 4, "mlp": ("h",) * (2 if fam == "llama" else 1) + ("f",),
                  "all": ("h",) * (6 if fam == "llama" else 5) + ("f",)}[wl.split("-")[1]]
        terms["Lth"] += 2.0 * inputs.count("h")
        terms["Ltf"] += 2.0 * inputs.count("f")
    else:  # eager from sdpa
        terms.update(Lta=0.0, Lbas2=FP32 if prec == "fp32" else 2.0, Ls2=1.0)
    return tuple(terms[n] for n in BASIS)


def _mode_table(quantity: str) -> np.ndarray:
    """Coefficients indexed [family, precision, workload table, recompute (none 0 / full 1),
    attention (sdpa 0 / eager 1), basis]."""
    table = np.zeros((len(FAMILIES), len(PRECISIONS), len(WORKLOAD_TABLES), 2, 2, len(BASIS)))
    for f, fam in enumerate(FAMILIES):
        for p, prec in enumerate(PRECISIONS):
            for w, wl in enumerate(WORKLOAD_TABLES):
                for r, rc in enumerate(("none", "full")):
                    for a, att in enumerate(ATTENTION_TABLES):
                        table[f, p, w, r, a] = _coefficients(fam, prec, wl, rc, att, quantity)
    return table


SAVED = _mode_table("saved")


def workload_table(c: Columns) -> Array:
    """Which table a job uses: 0 full training; for LoRA the smallest fitted target set that holds
    its adapters (exact for those sets; another set is read from its smallest superset)."""
    attn = (c.lora_q + c.lora_k + c.lora_v + c.lora_o) > 0
    mlp = (c.lora_gate + c.lora_up + c.lora_down) > 0
    within_qv = (c.lora_k + c.lora_o == 0) & ~mlp
    lora = np.where(within_qv, 1, np.where(~mlp, 2, np.where(~attn, 3, 4)))
    return np.where(c.lora == 1, lora, 0)


def _mode_index(c: Columns) -> tuple[Array, ...]:
    """Selective recompute re-runs the attention core in backward, so nothing of it is kept:
    it reads the sdpa table (an approximation: selective is not linear in the basis)."""
    eager = (c.eager_attention == 1) & (c.recompute_selective == 0)
    return (c.family.astype(int), precision_class(c).astype(int), workload_table(c).astype(int),
            c.recompute_full.astype(int), eager.astype(int))


def _ext_table() -> np.ndarray:
    """The newer architectures' coefficients (llama family), [class, precision, workload, recompute,
    attention, EXT_BASIS]. A mode without its own fit reads the sdpa fit of its precision,
    workload and recompute, else the closest LoRA set; a class without one reads the base class."""
    table = np.zeros((len(EXT_CLASSES), len(PRECISIONS), len(WORKLOAD_TABLES), 2, 2, len(EXT_BASIS)))
    fallback_wl = {"lora-mlp": "lora-all", "lora-qv": "lora-qkvo", "lora-qkvo": "lora-qv", "lora-all": "lora-qkvo"}
    for k, cls in enumerate(EXT_CLASSES):
        for p, prec in enumerate(PRECISIONS):
            for w, wl in enumerate(WORKLOAD_TABLES):
                for r, rc in enumerate(("none", "full")):
                    for a, att in enumerate(ATTENTION_TABLES):
                        keys = [(prec, *k) for k in ((cls, wl, att), (cls, wl, "sdpa"),
                                                     (cls, fallback_wl.get(wl, wl), "sdpa"),
                                                     ("base", wl, att), ("base", wl, "sdpa"))]
                        if prec in KBIT_PRECISIONS:  # no fit of their own: the same step without kbit's casts
                            keys = [(KBIT_FALLBACK[prec], *k[1:]) for k in keys]
                        for key_prec, key_cls, key_wl, key_att in keys:
                            coef = EXT_COEFFICIENTS.get(f"llama/{key_cls}/{key_prec}/{key_wl}/{rc}/{key_att}/saved")
                            if coef is not None:
                                table[k, p, w, r, a] = coef
                                break
    return table


EXT_SAVED = _ext_table()


def ext_rows(c: Columns) -> tuple[np.ndarray, Array | None, np.ndarray | None]:
    """(the rows with a newer feature, their architecture class, their EXT_BASIS values): what
    every `ext_saved_bytes` of one set of rows shares, so a caller summing several evaluates it once."""
    rows = newer_architecture(c)
    if not rows.any():
        return rows, None, None
    sub = c if rows.all() else c.take(rows)
    return rows, ext_class(sub).astype(int), ext_basis_values(sub)


def ext_saved_bytes(c: Columns, index: tuple[Array, ...] | None = None, mask: np.ndarray | None = None,
                    parts: tuple[np.ndarray, Array | None, np.ndarray | None] | None = None) -> Array:
    """The newer features' share of the saved activations (0 for gpt2 / bert and classic models;
    evaluated on the rows that have a newer feature only, so classic grids pay nothing); `parts`:
    `ext_rows(c)`, when the caller has it."""
    rows, classes, values = ext_rows(c) if parts is None else parts
    out = np.zeros(len(c))
    if not rows.any():
        return out
    idx = _mode_index(c) if index is None else index
    coef = EXT_SAVED[(classes, *(i[rows] for i in idx[1:]))] * (1.0 if mask is None else mask)
    out[rows] = (coef * values).sum(axis=-1)
    return out


def per_op_sac_bytes(c: Columns, kernel: Array | None = None) -> tuple[Array, Array, Array]:
    """recompute=op (torchtitan's per-op selective checkpointing, formulas/sac.py): (every block's
    kept matmul and attention outputs, the last block's, what of a block's own its re-run leaves
    alive); zeros at once when no row runs it."""
    if not (c.recompute_op == 1).any():
        zero = np.zeros(len(c))
        return zero, zero, zero
    kernel = sdpa_kernel(c) if kernel is None else kernel
    cb = compute_bytes(c)
    return sac_total_bytes(c, kernel, cb, np.where(autocast(c), cb, trainable_bytes(c)), _sdpa_dims(c)[1])


def saved_activations_bytes(c: Columns, kernel: Array | None = None, ext: tuple | None = None,
                            sac: tuple[Array, ...] | None = None) -> Array:
    """What autograd holds when the forward (and the loss) ends (incl. the fp32 log-softmax, t*V*4;
    with eager attention the b*a*s^2 probabilities; with recompute, the masks checkpoints hold;
    with per-op selective checkpointing, every block's kept outputs)."""
    coef = SAVED[_mode_index(c)]
    return ((coef * basis_values(c)).sum(axis=-1) + ext_saved_bytes(c, parts=ext) + held_mask_bytes(c) + fused_loss_saved_bytes(c)
            + (sac or per_op_sac_bytes(c, kernel))[0]
            + fused_kernels_saved_bytes(c) + router_fp32_saved_bytes(c)
            + math_attention_saved_bytes(c, kernel)
            + c.layers * softcap_scores_bytes(c) * (1 - c.recompute_full) * (1 - c.recompute_selective)
            + gelu_layers(c) * gelu_ops_bytes(c) * (1 - c.recompute_full) + dropout_saved_bytes(c, kernel)
            + c.local_layers * efficient_mask_bytes(c) * (1 - c.recompute_full) * (1 - c.recompute_selective)
            * (c.training == 1))


def dropout_layer_bytes(c: Columns, first: bool = False, kernel: Array | None = None) -> Array:
    """Training: what one layer's dropouts keep for the backward (a later layer's, or with `first`
    the first layer's, where a LoRA step's frozen embedding leaves some inputs without a gradient).
    CUDA's dropout (`native_dropout`, aten/src/ATen/native/Dropout.cpp) keeps a bool mask, one byte
    an element, whenever its input needs a gradient; the dropped copy is new, and kept when an op
    saves it in place of its input:

    - the attention's and the MLP's outputs (`model.hidden_dropout`): one t*h mask each (the
      residual add keeps nothing);
    - eager attention's probabilities (`model.attention_dropout`; a fused SDPA kernel draws the mask
      inside and keeps a seed): a b*a*s^2 mask, and the dropped copy where no cast stood between the
      softmax and the matmul (the copy then replaces nothing): pure GPT-2 / BERT, fp32, gpt-oss's
      sinks in their own dtype; a llama-family model's fp32 softmax is cast first (the cast copy is
      replaced by the dropped one). Selective recompute re-runs the attention core: nothing kept;
    - LoRA's `lora_dropout` (peft's Linear: `lora_A(dropout(x))`): each adapter drops its input.
      Under autocast its dropped copy is cast again (the 16-bit copy is kept either way): the mask
      only. Without autocast the dropped copy replaces the shared input `lora_A` kept: every
      adapter's copy and mask, less one input per group of adapters that read the same tensor
      (q, k, v read one norm's output; gate, up the other's, or the same in a one-norm parallel
      block; o reads a view of a fused SDPA kernel's output, which the kernel keeps anyway, but a
      copy after eager attention, the math kernel or MLA's sliced values). In the first layer of
      a LoRA step the inputs of adapters with no adapter upstream need no gradient: no mask.
      Routed experts get no dropout (peft cannot adapt them; memsweep's expert adapters have none);
      shared experts do."""
    if not (c.hidden_dropout.any() or c.attn_dropout.any() or c.lora_dropout.any()):
        return np.zeros(len(c))  # (a planner grid without dropout pays nothing)
    t = c.batch * c.seq
    cb = compute_bytes(c)
    lora = c.lora == 1
    grad_in = ~lora | (c.kbit == 1) | (not first)  # the layer's input needs a gradient
    att_targets = (c.lora_q + c.lora_k + c.lora_v + c.lora_o) > 0
    mlp_targets = (c.lora_gate + c.lora_up + c.lora_down) > 0
    # hidden: the attention output's mask needs a gradient there (an adapter in the attention, or
    # one upstream); the MLP's, an adapter in the MLP or (a sequential block) in its attention
    att_out = grad_in | att_targets
    mlp_out = grad_in | mlp_targets | ((c.parallel_block == 0) & att_targets)
    hidden = np.where(c.hidden_dropout > 0, (att_out + 0.0 + mlp_out) * t * c.hidden, 0.0)
    # eager attention probabilities (every layer attends s keys; the window is a mask)
    probs_on = (c.recompute_selective == 0) & (grad_in | (c.lora_q + c.lora_k > 0))
    probs = np.where(probs_on, attention_dropout_bytes(c) * c.tp, 0.0)
    # LoRA dropout: each adapter's input width, and the distinct inputs they read
    q_in = np.where(c.mla == 1, c.hidden + c.q_lora_rank * (c.q_lora_rank > 0), c.hidden)
    v_in = np.where(c.mla == 1, c.kv_lora_rank, c.hidden)
    dense = np.where(first, (c.moe_layers < c.layers) + 0.0, 1.0 - c.moe_layers / c.layers)  # a dense MLP
    ffn_w = dense * c.ffn + (1.0 - dense) * c.shared_ffn
    has_mlp = (dense > 0) | (c.shared_ffn > 0)
    widths = (c.lora_q * q_in + c.lora_k * c.hidden + c.lora_v * v_in + c.lora_o * c.heads * c.v_head_dim
              + has_mlp * ((c.lora_gate + c.lora_up) * c.hidden + c.lora_down * ffn_w))
    attn_x = (c.lora_q + c.lora_k + ((c.lora_v == 1) & (c.mla == 0))) > 0  # the attention norm's output
    mlp_x = ((c.lora_gate + c.lora_up) > 0) & has_mlp
    one_norm = (c.parallel_block == 1) & (c.block_norms == 1)
    shared_x = np.where(one_norm, (attn_x | mlp_x) + 0.0, attn_x + 0.0 + mlp_x) * c.hidden
    qkv = (c.lora_q + c.lora_k + c.lora_v) > 0
    # (selective recompute keeps no kernel output, nor the first layer of a LoRA step without
    # q/k/v adapters: o's input is then its adapter's alone)
    o_copy = ((c.eager_attention == 1) | (c.mla == 1) | (c.recompute_selective == 1)
              | (first & lora & ~qkv & (c.kbit == 0)))
    if (c.lora_o * c.lora_dropout > 0).any():
        o_copy = o_copy | ((kernel if kernel is not None else sdpa_kernel(c)) == MATH_KERNEL)
    distinct = (shared_x + o_copy * c.lora_o * c.heads * c.v_head_dim + has_mlp * c.lora_down * ffn_w
                + (c.mla == 1) * (c.lora_q * c.q_lora_rank * (c.q_lora_rank > 0) + c.lora_v * v_in))
    ab = trainable_bytes(c)
    recast = autocast(c) | (c.kbit == 1)
    # the first layer's norm outputs need no gradient (a frozen embedding): no mask for the adapters
    # reading them; the MLP norm's in a sequential block does when the attention has an adapter
    mlp_frozen = (c.parallel_block == 1) | ~att_targets
    no_mask = ((c.lora_q + c.lora_k + (c.mla == 0) * c.lora_v) * c.hidden
               + ~qkv * c.lora_o * c.heads * c.v_head_dim
               + has_mlp * mlp_frozen * (c.lora_gate + c.lora_up) * c.hidden
               + has_mlp * (mlp_frozen & ((c.lora_gate + c.lora_up) == 0)) * c.lora_down * ffn_w)
    masked = np.where(first & lora & (c.kbit == 0), widths - no_mask, widths)
    lora_bytes = np.where(recast, masked, widths * ab + masked - distinct * ab)
    lora_bytes = np.where(lora & (c.lora_dropout > 0), t * lora_bytes, 0.0)
    out = np.where(c.training == 1, hidden + probs + lora_bytes, 0.0)
    return out / c.tp


def attention_dropout_bytes(c: Columns) -> Array:
    """One layer's eager attention dropout (`model.attention_dropout`): a b*a*s^2 bool mask, and
    the dropped copy where no cast stood between the softmax and the matmul (the copy then
    replaces nothing): pure GPT-2 / BERT, fp32, gpt-oss's sinks in their own dtype; a llama-family
    model's fp32 softmax is cast first (the cast copy is replaced by the dropped one)."""
    cb = compute_bytes(c)
    sinks = c.attention_sinks == 1
    no_cast = np.where(sinks, ~(autocast(c) & (c.lora == 0)),
                       np.where(fp32_softmax(c), cb == FP32, ~autocast(c) | (cb == FP32)))
    on = (c.attn_dropout > 0) & (c.eager_attention == 1) & (c.training == 1)
    return np.where(on, c.batch * c.heads * c.seq**2 * (1.0 + no_cast * cb) / c.tp, 0.0)


def embedding_dropout_bytes(c: Columns) -> Array:
    """Training with `model.embedding_dropout`, when the embedding's output needs a gradient (full
    training, or a k-bit-prepared LoRA base): its t*h mask. (The dropped copy replaces the
    embeddings as the hidden state; the undropped ones a decoder's forward holds die with it.)"""
    on = (c.embedding_dropout > 0) & (c.training == 1) & ((c.lora == 0) | (c.kbit == 1))
    return np.where(on, c.batch * c.seq * c.hidden, 0.0) / c.tp


def dropout_saved_bytes(c: Columns, kernel: Array | None = None) -> Array:
    """Every layer's dropout masks and copies (`dropout_layer_bytes`) and the embedding's, at the
    end of the forward; with full recompute only the embedding's (the re-run block holds one layer's)."""
    layers = dropout_layer_bytes(c, True, kernel) + (c.layers - 1) * dropout_layer_bytes(c, kernel=kernel)
    return np.where(c.recompute_full == 1, 0.0, layers) + embedding_dropout_bytes(c)


def gelu_layers(c: Columns) -> Array:
    """Dense layers whose GELU input needs a gradient (so autograd keeps a written-out GELU's
    intermediates): all when the model trains; with LoRA, the first layer's only when an adapter
    feeds its MLP (on gate or up, or on attention in a sequential block: a parallel block's MLP
    reads the norm of the frozen embedding) or the embedding output requires grad
    (prepare_model_for_kbit_training); every later layer once any adapter exists."""
    first = ((c.lora_up == 1) | (c.lora_gate == 1) | (c.kbit == 1)
             | ((c.parallel_block == 0) & ((c.lora_q + c.lora_k + c.lora_v + c.lora_o) > 0)))
    dense = c.layers - c.moe_layers
    return np.where(c.lora == 1, np.maximum(dense - 1, 0) + first * (dense > 0), dense)


def written_out_gelu(c: Columns) -> Array:
    """ACTIVATIONS index of the GELU a row's MLP writes out op by op: GPT-2's own gelu_new (2), a
    llama-family model's `model.activation` (`gelu_ops`), none for BERT (torch's one kernel)."""
    return np.where(c.family == FAMILY_CODES["gpt2"], 2.0, np.where(c.family == FAMILY_CODES["llama"], c.gelu_ops, 0.0))


def gelu_ops_bytes(c: Columns, backward: bool = False, ops: Array | None = None) -> Array:
    """One dense layer's GELU written out op by op (ModelSpec.activation, transformers'
    hidden_act), training: what autograd keeps beyond the fused kernel, which keeps its input x
    alone. gelu_fast (`0.5 * x * (1 + tanh(x * 0.79788 * (1 + 0.044715 * x * x)))`,
    FastGELUActivation): x * 0.79788, 0.044715 x, the (1 + ...) factor, tanh(.), 0.5 x and 1 + tanh(.)
    (x too, for 0.044715 x * x): six more t*f tensors in the compute dtype (no operator there is on
    autocast's fp32 list). gelu_python (`x * 0.5 * (1 + erf(x / sqrt 2))`): x / sqrt 2, 0.5 x and
    1 + erf(.), but not x itself: two more. gelu_new (NewGELUActivation): `pow(x, 3)` keeps x,
    then tanh(.), 0.5 x and 1 + tanh(.): three more; under autocast `pow` runs in fp32 (CUDA's list),
    so it keeps x's fp32 copy instead of x, and tanh(.) and 1 + tanh(.) are fp32: 4 + 4 + 2 + 4 - 2
    bytes. `backward`: inside the chain's backward (the moment of a re-run block), the gradients
    of its intermediates add one more tensor (tanh's), three for the erf form (exp(-x^2) and its
    products). From the operators' derivatives (tools/autograd/derivatives.yaml); every count is
    the reference step's (tests/test_detailed_accuracy.py)."""
    cb = compute_bytes(c)
    # `ops`: which GELU, where the caller knows it (GPT-2's gelu_new, which its own table holds);
    # else the llama family's `gelu_ops`
    ops = np.where(c.family == FAMILY_CODES["llama"], c.gelu_ops, 0.0) if ops is None else ops
    # (a GeGLU's product then keeps gelu_new's fp32 output instead of a 16-bit one: 2 more)
    per = np.select([ops == 1, ops == 3, (ops == 2) & autocast(c), ops == 2],
                    [6.0 * cb, 2.0 * cb, 4.0 + 4.0 + 2.0 + 4.0 - 2.0 + 2.0 * c.geglu, 3.0 * cb], default=0.0)
    if backward:
        per = per + np.select([ops == 3, ops > 0], [3.0 * cb, cb], default=0.0)
    on = c.training == 1
    return np.where(on, per * c.batch * c.seq * c.ffn / c.tp, 0.0)


def sdpa_input_bytes(c: Columns) -> Array:
    """The element of the q, k, v SDPA gets: autocast casts them to 16 bits (CUDA's list has
    `scaled_dot_product_attention` as lower precision); else the projections' own."""
    return np.where(autocast(c), 2.0, linear_out_bytes(c))


def _sdpa_dims(c: Columns) -> tuple[Array, Array]:
    """Query/key and value head sizes SDPA sees: the reference pads MLA's narrower values to the
    query size (as transformers' DeepSeek does for its fused path)."""
    dq = np.where(c.mla == 1, np.maximum(c.head_dim, c.v_head_dim), c.head_dim)
    return dq, np.where(c.mla == 1, dq, c.v_head_dim)


MATH_KERNEL = KERNELS.index("math")
EFFICIENT_KERNEL = KERNELS.index("efficient")


def efficient_mask_bytes(c: Columns) -> Array:
    """One sliding-window layer's SDPA call past its window, on the memory-efficient kernel (an
    A100's pick for a masked call, an H100's when dropout rules cuDNN out), with s not a multiple
    of 16: attention.cpp's `preprocess_mask` expands the (b, 1, s, s) additive mask to every head
    and pads its last dimension to a multiple of 16, which materialises a (b, a, s, ceil16(s))
    tensor in the query's dtype; the kernel keeps it for the backward in place of the (b, 1, s, s)
    mask it was made from. The bytes it adds, per such call (0 elsewhere)."""
    on = (c.eager_attention == 0) & (c.local_layers > 0) & (c.seq > c.window) & (c.seq % 16 != 0)
    if not on.any():
        return np.zeros(len(c))
    on &= sdpa_kernel(c, masked=True) == EFFICIENT_KERNEL
    s16 = np.ceil(c.seq / 16.0) * 16.0
    return np.where(on, c.batch * c.seq * (c.heads / c.tp * s16 - c.seq) * sdpa_input_bytes(c), 0.0)


def _distinct_rows(*columns: Array) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct rows of these integer-valued columns, each row's index among them). A planner
    chunk varies seq and batch, which no kernel rule reads: usually one distinct row (no sort), or
    a few models' rows, numbered by one mixed-radix integer per row (a 1-D sort, not a row sort)."""
    columns = np.broadcast_arrays(*columns)
    if all(x[0] == x[-1] and (x == x[0]).all() for x in columns):
        return np.array([[x[0] for x in columns]], dtype=np.int64), np.zeros(len(columns[0]), dtype=np.intp)
    keys = np.stack(columns, axis=1).astype(np.int64)
    lo = keys.min(axis=0)
    span = tuple(int(x) for x in keys.max(axis=0) - lo + 1)
    if math.prod(span) >= 2**62:  # too wide for one integer: sort the rows themselves
        return np.unique(keys, axis=0, return_inverse=True)
    codes, inverse = np.unique(np.ravel_multi_index(tuple((keys - lo).T), span), return_inverse=True)
    return np.column_stack(np.unravel_index(codes, span)) + lo, inverse


def sdpa_kernel(c: Columns, masked: Array | bool = False) -> Array:
    """The kernel (index into sdpa_rules.KERNELS) PyTorch picks on the job's GPU for a training
    or prefill call of one layer, by `sdpa_rules.choose` (torch's sdp_utils.cpp): a global
    layer's call (is_causal, no mask) or, `masked`, a sliding-window layer's past its window (a
    mask). As transformers calls it (and the reference model): K/V shared by `enable_gqa` when no
    mask is passed and the head sizes are equal and <= 256, else repeated to every head, but for
    Falcon's call (`model.sdpa_mask`: its mask and its one K/V head, no enable_gqa)."""
    sm = np.where(c.sm > 0, c.sm, 80.0)
    half = sdpa_input_bytes(c) == 2.0
    dq, dv = _sdpa_dims(c)
    gqa = c.kv_heads != c.heads
    falcon = c.sdpa_mask == 1
    mask = falcon | np.asarray(masked, dtype=bool)
    shared = gqa & ~mask & (dq == dv) & (dq <= 256)
    kv = np.where(shared | falcon, c.kv_heads, c.heads)
    # training passes the attention dropout (transformers: `dropout=0.0 if not self.training`);
    # cuDNN takes only multiples of 1/16 (sdp_utils.cpp), so p itself is read, in 1/1024 steps
    drop = np.where(c.training == 1, np.round(c.attn_dropout * 1024.0), 0.0)
    rows, inverse = _distinct_rows(sm, half, dq, dv, c.heads, kv, mask, shared, c.training, drop)
    codes = np.array([KERNELS.index(choose(Call(
        dtype="bfloat16" if r_half else "float32", batch=1, heads=int(heads), kv_heads=int(r_kv), t=2, s=2,
        d_qk=int(r_dq), d_v=int(r_dv), mask="ok" if r_mask else "none", is_causal=not r_mask,
        enable_gqa=bool(r_shared), requires_grad=bool(train), dropout=float(r_drop) / 1024.0),
        (int(r_sm) // 10, int(r_sm) % 10)))
        for r_sm, r_half, r_dq, r_dv, heads, r_kv, r_mask, r_shared, train, r_drop in rows])
    return codes[inverse]


def attn_kernel_names(c: Columns) -> list[str]:
    """The `attn_kernel` column: the global layers' SDPA kernel, "+" the sliding-window layers'
    where they differ; eager where no SDPA runs."""
    glob, local = sdpa_kernel(c), sdpa_kernel(c, masked=True)
    windowed = (c.local_layers > 0) & (c.seq > c.window)
    out = []
    for i in range(len(c)):
        if c.eager_attention[i] == 1:
            out.append("eager")
            continue
        name = KERNELS[int(glob[i])] if c.local_layers[i] < c.layers[i] else ""
        if windowed[i] and (not name or local[i] != glob[i]):
            name = "+".join(filter(None, (name, KERNELS[int(local[i])])))
        out.append(name or KERNELS[int(glob[i])])
    return out


def global_call(c: Columns) -> Array:
    """Some layer makes the global (unmasked, causal) SDPA call `sdpa_kernel(c)` picks for: a
    global layer exists, or every sliding window covers the sequence."""
    return (c.layers > c.local_layers) | (c.seq <= c.window)


def math_layer_bytes(c: Columns, kernel: Array | None = None) -> Array:
    """What the math kernel keeps for one global layer's backward beyond what a fused kernel keeps
    (0 where a fused kernel or eager attention runs, and outside training).

    ATen's `_scaled_dot_product_attention_math` (attention.cpp) upcasts 16-bit q, k, v to fp32
    (`allowFP16BF16ReductionMathSDP` is off by default), repeats K and V to every head under
    `enable_gqa`, scales q and k by sqrt(scale) each (new tensors), and autograd keeps q*, k*, the
    fp32 probabilities (b*a*s^2) and the fp32 V (the given V itself when it is fp32 and not
    repeated). A fused kernel keeps q, k, v, its output and the fp32 row log-sum-exp instead."""
    kernel = sdpa_kernel(c) if kernel is None else kernel
    on = (kernel == MATH_KERNEL) & (c.eager_attention == 0) & (c.training == 1) & global_call(c)
    if not on.any():  # the usual case: evaluate nothing more
        return np.zeros(len(c))
    b, t, a = c.batch, c.seq, c.heads / c.tp
    kv = np.maximum(c.kv_heads / c.tp, 1.0)
    dq, dv = _sdpa_dims(c)
    cb = sdpa_input_bytes(c)
    gqa = c.kv_heads != c.heads
    repeated = gqa & (c.sdpa_mask == 0)  # enable_gqa: the math kernel repeat_interleaves K and V
    k_heads = np.where(repeated, a, kv)
    v_new = (cb != FP32) | repeated
    math_ = FP32 * b * (a * t * dq + k_heads * t * dq + a * t * t + v_new * k_heads * t * dv)
    fused = b * (cb * (a * t * dq + kv * t * dq + v_new * kv * t * dv + a * t * dv) + FP32 * a * t)
    return np.where(on, math_ - fused, 0.0)


def math_mask_bytes(c: Columns) -> Array:
    """The masks SDPA's math kernel reads in one call: the causal mask it builds (bool, then its
    fp32 additive copy), or a model's own bool mask (Falcon) and its additive copy in the compute
    dtype."""
    return c.seq**2 * np.where(c.sdpa_mask == 1, c.batch * (1 + compute_bytes(c)), 1 + FP32)


def softmax_transient_bytes(c: Columns, cb: Array) -> Array:
    """Bytes per score alive beside the eager scores (of `cb` bytes) while the softmax runs: an
    fp32 softmax of 16-bit scores (a llama-family model's softmax(dtype=float32), autocast's fp32
    softmax) first converts them (ATen's softmax copies the input unless it is CUDA fp16 with an
    fp32 result), so the copy and the fp32 result, 4 + 4; an fp32 model's, its result; else the
    result in the scores' dtype. gpt-oss's sinks (transformers' gpt_oss eager_attention_forward):
    the scores stay referenced while the sink-joined logits, their max-subtracted copy and its
    softmax are made, two of them at a time, in the joined dtype (fp32 with trained fp32 sinks
    under autocast, else the scores')."""
    upcast = fp32_softmax(c) | autocast(c)
    joined = np.where(autocast(c) & (c.lora == 0), FP32, cb)
    return np.where(c.attention_sinks == 1, 2.0 * joined,
                    np.where(upcast, np.where(cb < FP32, 2.0 * FP32, FP32), cb))


def math_softmax_backward_bytes(c: Columns) -> Array:
    """The math kernel's softmax backward: the fp32 gradients of its probabilities and scores."""
    return 2 * FP32 * c.batch * c.heads * c.seq**2 / c.tp


def math_attention_saved_bytes(c: Columns, kernel: Array | None = None) -> Array:
    """`math_layer_bytes` of every global layer, kept to the backward without recompute."""
    plain = (c.recompute_full == 0) & (c.recompute_selective == 0)
    global_layers = c.layers - np.where(c.seq > c.window, c.local_layers, 0.0)
    # LoRA: the first layer's core keeps nothing when nothing before it needs a gradient (no
    # adapter on q, k or v, a frozen embedding); that layer is a global one unless the model's
    # pattern starts local (Gemma-2/3, gpt-oss: local layers first)
    first_global = (c.local_layers == 0) | (c.seq <= c.window)
    frozen_first = (c.lora == 1) & (c.lora_q + c.lora_k + c.lora_v == 0) & (c.kbit == 0) & first_global
    return np.where(plain, np.maximum(global_layers - frozen_first, 0.0) * math_layer_bytes(c, kernel), 0.0)


def softcap_scores_bytes(c: Columns) -> Array:
    """Gemma-2's attention soft-capping, one layer, eager training: tanh(scores / cap) * cap keeps
    the tanh's output for its backward, b*a*s^2 in the scores' dtype (transformers'
    gemma2 `eager_attention_forward`: the divide and the multiply by a number keep nothing).
    Selective recompute re-runs the attention core (nothing kept); full recompute keeps it in the
    re-run block only (`_recompute_block`)."""
    on = (c.attn_softcap == 1) & (c.eager_attention == 1) & (c.training == 1)
    return np.where(on, c.batch * c.heads * c.seq**2 * plain_matmul_bytes(c) / c.tp, 0.0)


def final_softcap_bytes(c: Columns) -> Array:
    """Gemma-2's final soft-capping, training: `logits / cap`, `tanh`, `* cap` (transformers'
    Gemma2ForCausalLM.forward) keep the tanh's output, t*V in the logits' dtype, from the forward
    until its backward (after the loss's); Liger's fused loss caps inside its kernel."""
    on = (c.final_softcap == 1) & (c.training == 1) & (c.fused_loss == 0)
    return np.where(on, c.batch * c.seq * c.vocab * plain_matmul_bytes(c) / c.tp, 0.0)


def fused_loss_saved_bytes(c: Columns) -> Array:
    """Liger's fused linear cross-entropy computes the loss's gradients in the forward and saves
    them instead of the fp32 log-softmax (t*V*4) and the head's input (t*h in the compute dtype,
    when the head trains): the input's gradient (t*h in the input's dtype) and, when the head
    trains, its weight's gradient (V*h, the weight's dtype), which becomes that gradient."""
    t = c.batch * c.seq
    head_trains = c.lora == 0
    delta = (-FP32 * t * c.vocab + t * c.hidden * hidden_bytes(c) - head_trains * t * c.hidden * compute_bytes(c)
             + head_trains * c.vocab * c.hidden * trainable_bytes(c) / c.tp)
    return np.where((c.fused_loss == 1) & (c.training == 1), delta, 0.0)


def _norm_delta(c: Columns, elements: Array, x_bytes: Array, trains: Array) -> Array:
    """One norm run as a fused kernel instead of op by op, training: the change in what it saves
    over `elements` (rows x width) values whose input is `x_bytes` wide (docs/kernels.md).
    Eager RMSNorm (transformers' LlamaRMSNorm): x.float() (a 4-byte copy, saved by pow and mul,
    when x is 16-bit; x itself when fp32), rsqrt's row statistic, and, when the weight trains,
    the normalised row in x's dtype (saved by `weight * .`). Eager LayerNorm: native_layer_norm
    saves its input (autocast's fp32 copy of a 16-bit one) and its row statistics. The fused
    kernel (Liger's LigerRMSNormFunction / LigerLayerNormFunction, flash-attn's layer_norm_fn)
    saves x in its own dtype and the row statistics."""
    upcast = np.where(x_bytes < FP32, x_bytes - FP32, 0.0)
    rms = upcast - trains * x_bytes
    layer = np.where(autocast(c), upcast, 0.0)
    return elements * np.where(c.layer_norm == 1, layer, rms)


def fused_norm_saved_bytes(c: Columns) -> tuple[Array, Array, Array]:
    """kernels.norm=fused, training: the change in the saved set (every block's, the final norm's
    (and BERT's embedding norm's), one block's), see `_norm_delta`. A block's norms: one or two before attention and MLP on the residual
    stream (hidden dtype), Gemma's two post-norms on the projections' outputs, the q/k norms on q
    and k (Qwen3, OLMoE), MLA's latent norms; the weights train in full training only."""
    t = c.batch * c.seq
    trains = (c.lora == 0).astype(float)
    ob = linear_out_bytes(c)
    hb = hidden_bytes(c)
    pre = np.minimum(c.block_norms, 2.0)
    stream = _norm_delta(c, t * c.hidden, hb, trains)
    block = pre * stream
    block = block + np.where(c.block_norms == 4, 2.0 * _norm_delta(c, t * c.hidden, ob, trains), 0.0)
    qk = np.isin(c.qk_norm, (1.0, 2.0)) & (c.mla == 0)
    block = block + np.where(qk, _norm_delta(c, t * (c.heads + c.kv_heads) * c.head_dim, ob, trains), 0.0)
    block = block + np.where(c.mla == 1, _norm_delta(c, t * (c.q_lora_rank + c.kv_lora_rank), ob, trains), 0.0)
    final = np.where(c.final_norm == 1, stream, 0.0) + c.embedding_norm * stream
    # LoRA: the frozen embedding's output needs no gradient, so the first norm on it (the first
    # block's, or BERT's embedding norm) saves nothing, fused or not
    blocks = block * c.layers - c.lora * stream
    # compiled blocks: the partitioner saves a norm's input and statistic and recomputes the rest,
    # as the fused kernel does; the final norm runs outside the blocks, eager
    on = ((c.fused_norm == 1) | (c.compiled == 1)) & (c.training == 1)
    final_on = (c.fused_norm == 1) & (c.training == 1)
    return np.where(on, blocks / c.tp, 0.0), np.where(final_on, final / c.tp, 0.0), np.where(on, block / c.tp, 0.0)


def fused_mlp_saved_bytes(c: Columns) -> Array:
    """kernels.mlp=fused, training, per dense block: a gated MLP's activation and product are one
    kernel saving gate(x) and up(x) (Liger's LigerSiLUMulFunction / LigerGELUMulFunction), so
    act(gate(x)) is no longer kept (t*f in the projections' dtype); a GELU written out op by op
    (transformers' gelu_fast / gelu_new / gelu_python, GPT-2's gelu_new) becomes one kernel that
    keeps its input alone (`gelu_ops_bytes`). Routed experts run eager; shared experts are MLPs."""
    t = c.batch * c.seq
    ob = linear_out_bytes(c)
    gelu = gelu_ops_bytes(c, ops=written_out_gelu(c))
    dense_ffn = np.where(c.moe_layers > 0, c.shared_ffn, c.ffn)
    gated = np.where(c.gated_mlp == 1, t * dense_ffn * ob / c.tp, 0.0)
    # (compiled blocks: the partitioner recomputes the activation from gate(x) and up(x) the same way)
    on = ((c.fused_mlp == 1) | (c.compiled == 1)) & (c.training == 1) & (c.family != FAMILY_CODES["bert"])
    return np.where(on, -(gated + gelu * (c.moe_layers == 0)), 0.0)


def _any_kernels(c: Columns) -> bool:
    """Whether any row runs a fused kernel or a compiled block (else the kernels' terms are 0)."""
    return bool(((c.fused_norm == 1) | (c.fused_mlp == 1) | (c.compiled == 1) | (c.fused_ce == 1)).any())


def fused_block_saved_bytes(c: Columns) -> Array:
    """One block's share of `fused_kernels_saved_bytes` (a re-run block under full recompute): its
    norms' and its MLP's (a dense one; an MoE block's shared experts)."""
    if not _any_kernels(c):
        return np.zeros(len(c))
    return fused_norm_saved_bytes(c)[2] + fused_mlp_saved_bytes(c)


def fused_kernels_saved_bytes(c: Columns) -> Array:
    """What the fused kernels change in the saved set (`kernels`; 0 for eager): per block the
    norms' and the MLP's (not under full recompute, which keeps only each block's input), the
    final norm's, and the loss's (`loss_slot_bytes`)."""
    if not _any_kernels(c):  # (the planner's millions of eager rows pay nothing)
        return np.zeros(len(c))
    blocks, final, _ = fused_norm_saved_bytes(c)
    dense_layers = c.layers - c.moe_layers
    per_block = blocks + fused_mlp_saved_bytes(c) * np.where(c.moe_layers > 0, c.moe_layers, dense_layers)
    # (an MoE model's dense layers run a dense MLP: those layers save as a dense model's)
    per_block = per_block + np.where(c.moe_layers > 0, fused_mlp_saved_bytes(replace(c, moe_layers=np.zeros_like(c.moe_layers)))
                                     * dense_layers, 0.0)
    # the logits instead of the log-softmax, and fp32 row statistics: the fused kernel's log-sum-exp,
    # or what the partitioner keeps of a compiled loss (the row maximum and the log of the sum)
    stats = np.where(c.fused_ce == 1, FP32, 2.0 * FP32) * c.batch * c.seq / c.tp
    loss = np.where(logits_kept(c) & (c.training == 1), loss_slot_bytes(c) - FP32 * c.batch * c.seq * c.vocab / c.tp + stats, 0.0)
    return per_block * (1 - c.recompute_full) + final + loss


def logits_kept(c: Columns) -> Array:
    """The loss saves the 16-bit logits, not an fp32 log-softmax: a fused cross-entropy kernel
    (kernels.loss=fused), or a compiled loss (kernels.compile with the eager loss: the partitioner
    keeps the logits and recomputes the softmax in the backward)."""
    return (c.fused_ce == 1) | ((c.compiled_loss == 1) & (c.fused_loss == 0))


def loss_slot_bytes(c: Columns) -> Array:
    """What the loss saves for its backward that its backward frees: the fp32 log-softmax (t*V*4)
    of an eager cross-entropy; the logits in their own dtype where they are kept (`logits_kept`);
    a fused loss's input gradient (t*h)."""
    t_v = c.batch * c.seq * c.vocab / c.tp
    # Liger's fused loss saved its input's gradient instead (`fused_loss_saved_bytes`)
    fused = (c.fused_loss == 1) & (c.training == 1)
    return np.where(fused, c.batch * c.seq * c.hidden * hidden_bytes(c),
                    np.where(logits_kept(c), t_v * plain_matmul_bytes(c), FP32 * t_v))


def router_fp32_saved_bytes(c: Columns) -> Array:
    """DeepSeek-V2/V3's router (`F.linear(hidden.float(), weight.float())`, `router_fp32_logits`),
    training, per MoE layer: a 16-bit step without autocast saves the fp32 copy of the router's
    weight (its input needs a gradient) and, when the router trains, of its input. Under autocast
    the matmul runs in 16 bits: with fp32 masters on the casts autocast makes anyway (nothing
    more); on a frozen 16-bit LoRA base the weight's fp32 copy is cast back, a new 16-bit tensor,
    saved. Not under full recompute (the re-run block's, beside it, is small)."""
    if not (c.router_fp32_logits == 1).any():
        return np.zeros(len(c))
    t, eh = c.batch * c.seq, c.experts * c.hidden
    pure = np.where(compute_bytes(c) < FP32, FP32 * (eh + (c.lora == 0) * t * c.hidden), 0.0)
    per_layer = np.where(autocast(c), c.lora * 2.0 * eh, np.where(c.kbit == 1, 0.0, pure))
    on = (c.training == 1) & (c.router_fp32_logits == 1) & (c.recompute_full == 0)
    return np.where(on, c.moe_layers * per_layer / c.tp, 0.0)


def hidden_state_bytes(c: Columns) -> Array:
    """One (b, s, h) hidden state in the hidden states' dtype, per rank (sequence parallel splits
    it over the tensor-parallel group)."""
    return c.batch * c.seq * c.hidden * hidden_bytes(c) / np.where(c.sequence_parallel == 1, c.tp, 1.0)


def hidden_bytes(c: Columns) -> Array:
    """The hidden states' dtype (the embedding's): fp32 under mixed precision (fp32 master
    weights) and after prepare_model_for_kbit_training (an fp32 embedding), else the compute
    dtype (a LoRA base is stored in the dtype)."""
    return np.where((autocast(c) & (c.lora == 0)) | (c.kbit == 1), FP32, compute_bytes(c))


def eager_mask_bytes(c: Columns) -> Array:
    """Eager attention in a decoder: transformers builds its causal mask once per forward as a
    float (b, 1, s, s) tensor in the hidden states' dtype (`torch.where(allowed, 0, min)`), and a
    second one, the sliding-window mask, when some layers are local (one mask when all are)."""
    masks = (c.layers > c.local_layers).astype(float) + (c.local_layers > 0)
    on = (c.eager_attention == 1) & (c.final_norm == 1)
    return np.where(on, masks * c.batch * c.seq**2 * hidden_bytes(c), 0.0)


def held_mask_bytes(c: Columns) -> Array:
    """The eager masks held after the forward: a checkpoint holds its inputs, the mask among them,
    until its backward (full or selective recompute); without recompute nothing keeps them (the
    masked add saves no input). The derive scripts subtract this from what they measure."""
    return np.where(c.training * (c.recompute_full + c.recompute_selective) > 0, eager_mask_bytes(c), 0.0)


def live_logits_bytes(c: Columns) -> Array:
    """Inside the loss: the LM head's output (t*V in the compute dtype) and, when that is 16-bit,
    its fp32 copy (`logits.float()`), besides the log-softmax already counted as saved."""
    t_v = c.batch * c.seq * c.vocab
    cb = plain_matmul_bytes(c)  # the head's output
    # torchtune's chunked loss: every chunk's logits (the head runs per chunk), one chunk's fp32
    # copy at a time; Liger: one chunk of logits, its gradient written in place
    chunked = t_v * (cb + np.where(cb < FP32, FP32, 0.0) / np.maximum(c.loss_chunks, 1.0))
    # a fused cross-entropy kernel: the logits are what it saves (`loss_slot_bytes`), nothing more
    # Liger's: one chunk's logits and its grad_input rows' matmul output, before they are copied in
    liger = tq.liger_chunk_tokens(c) * (c.vocab + c.hidden) * cb
    return np.select([c.fused_loss == 1, logits_kept(c)], [liger, 0.0], chunked)


def logits_gradient_bytes(c: Columns) -> Array:
    """Backward start: the NLL gradient and the log-softmax gradient, t*V fp32 each (of one chunk
    with torchtune's chunked loss: autograd runs every chunk's loss backward, one at a time, before
    the head's; none with Liger's, which made them in the forward)."""
    per_chunk = 2.0 * c.batch * c.seq * c.vocab * FP32 / np.maximum(c.loss_chunks, 1.0)
    # a fused kernel writes it into the logits' storage; Gemma-2's final soft-capping then makes the
    # gradient of `tanh(.) * cap` beside the saved tanh (t*V in the logits' dtype)
    t_v = c.batch * c.seq * c.vocab * plain_matmul_bytes(c) / c.tp
    # a compiled loss's backward graph writes a new 16-bit gradient beside the saved logits (which
    # the soft-capping's gradient replaces)
    return np.select([c.fused_loss == 1, c.fused_ce == 1, logits_kept(c)], [0.0, c.final_softcap * t_v, t_v], per_chunk)


PER_LAYER_TERMS = np.array([n.startswith("L") for n in BASIS])


RECOMPUTE_MLP_TENSORS = {True: 6.0, False: 4.0}
"""t*f tensors alive in the recomputed block's MLP backward, saved ones and gradients together:
SwiGLU 6 (gate, act and up saved, and the product's gradient with the two it makes; measured the
same with or without the product saved, i.e. full training or LoRA), GELU 4 (fc out, act and two
gradients)."""
FUSED_RECOMPUTE_MLP_TENSORS = 3.0
"""The same with a fused gated activation (kernels.mlp=fused): gate(x) and up(x), saved and then
overwritten with their gradients (Liger's swiglu backward), and the product's gradient."""
HEAD_TERMS = np.array([n in ("th", "tV", "Vh") for n in BASIS])
EXT_DENSE_FFN_TERMS = np.array([n in ("Dtf_gelu", "Dtf_geglu") for n in EXT_BASIS])
VH_TERM = np.array([n == "Vh" for n in BASIS])
FFN_TERM = np.array([n == "Ltf" for n in BASIS])
EXT_HEAD_TERMS = np.array([n in ("th_ln", "t_ln") for n in EXT_BASIS])
EXT_LAYER_TERMS = np.array([n[0] in "LMD" and n not in ("Mtf", "Mtkf", "MPf", "Mtfs", "Dtf_gelu", "Dtf_geglu")
                            for n in EXT_BASIS])


def _recompute_block(c: Columns, ext: tuple | None = None,
                     sac: tuple[Array, ...] | None = None) -> tuple[Array, Array, Array, Array, Array]:
    """Full recompute, the backward of one re-run block: (what is kept outside the blocks: ids,
    RoPE tables, eager masks, every block's checkpoint; the checkpoints' share of it; the block at
    its MLP backward; the block at its softmax backward, eager only). The re-run block saves a
    layer of the no-recompute table; at its MLP backward it holds that layer without the t*f terms
    plus `RECOMPUTE_MLP_TENSORS` t*f tensors, at its softmax backward that layer plus the b*a*s^2
    gradients (`softmax_backward_bytes`): the MLP's tensors are freed before the attention's
    backward starts, so the two are separate moments; last, the re-run layer at its attention's
    backward, without the scores' gradients (where SDPA's math kernel adds its own)."""
    idx = _mode_index(c)
    b = basis_values(c)
    ext = ext_rows(c) if ext is None else ext
    kept = ((SAVED[idx] * b * ~HEAD_TERMS).sum(axis=-1) + ext_saved_bytes(c, idx, ~EXT_HEAD_TERMS, ext)
            + held_mask_bytes(c))  # the first block's checkpoint holds the masks to the end
    checkpoints = ((SAVED[idx] * b * (PER_LAYER_TERMS & ~HEAD_TERMS)).sum(axis=-1)
                   + ext_saved_bytes(c, idx, EXT_LAYER_TERMS & ~EXT_HEAD_TERMS, ext))
    # per-op selective: the blocks before the last keep their saved outputs too (the last block's
    # are consumed by its re-run: saved again there, or freed); at the first block none is left
    sac_all, sac_last, sac_tail = sac or per_op_sac_bytes(c)
    kept = kept + sac_all - sac_last
    checkpoints = checkpoints + (sac_all - sac_last) * c.layers / np.maximum(c.layers - 1, 1.0)
    none_idx = idx[:3] + (np.zeros_like(idx[3]), idx[4])
    one_layer = ((SAVED[none_idx] * b * (PER_LAYER_TERMS & ~FFN_TERM)).sum(axis=-1)
                 + ext_saved_bytes(c, none_idx, EXT_LAYER_TERMS, ext)) / c.layers + softcap_scores_bytes(c)
    # the re-run block's fused norms save what they save in any block (its MLP's t*f tensors are
    # not in `one_layer`, FFN_TERM: the MLP moment below counts a fused MLP's own)
    one_layer = one_layer + (fused_norm_saved_bytes(c)[2] if _any_kernels(c) else 0.0)
    eager = (c.eager_attention == 1) & (c.recompute_selective == 0)
    # the MLP backward: `RECOMPUTE_MLP_TENSORS` t*f tensors in the compute dtype (SwiGLU: gate, act
    # and up saved, and the three gradients of the product's backward, whether or not the product
    # itself is saved), or, when more, the table's saved t*f bytes and two gradients (GPT-2's
    # gelu_new keeps four tensors, fp32 under autocast); an MoE block (in an MoE model) runs t*k
    # token copies (+ shared)
    n_ffn = np.where(c.gated_mlp == 1, RECOMPUTE_MLP_TENSORS[True], RECOMPUTE_MLP_TENSORS[False])
    ob = linear_out_bytes(c)
    # (a GELU / GeGLU MLP in a llama-family model: the table's t*f term is a gated MLP's, which the
    # D*t*f terms correct per dense layer)
    dense_ffn = ext_saved_bytes(c, none_idx, EXT_DENSE_FFN_TERMS, ext) / np.maximum(c.layers - c.moe_layers, 1.0)
    table = ((SAVED[none_idx] * b * FFN_TERM).sum(axis=-1) / c.layers + dense_ffn + gelu_ops_bytes(c, backward=True)
             + 2.0 * c.batch * c.seq * c.ffn * ob / c.tp)
    dense = np.maximum(n_ffn * c.batch * c.seq * c.ffn * ob / c.tp, table)
    # kernels.mlp=fused: the kernel saved gate(x) and up(x) and writes their gradients over them,
    # so beside the product's gradient nothing more (a GELU: one kernel, torch's 4 tensors)
    # (a fused GELU: fc's output, saved, the two gradients, and its output only where the down
    # projection's weight trains and so saves it: full training or LoRA on down; GPT-2 LoRA liger
    # +3.8 % -> trace with 4)
    gelu_fused = 3.0 + ((c.lora == 0) | (c.lora_down == 1))
    fused = np.where(c.gated_mlp == 1, FUSED_RECOMPUTE_MLP_TENSORS, gelu_fused)
    dense = np.where(c.fused_mlp == 1, fused * c.batch * c.seq * c.ffn * ob / c.tp, dense)
    width = c.experts_per_token * c.expert_ffn + c.shared_ffn
    mlp = np.where(c.moe_layers > 0, n_ffn * c.batch * c.seq * width * ob / c.tp, dense)
    # LoRA's re-run block at its MLP backward also holds a t*h tensor of its norm's backward
    # or, with an adapter on down, that adapter's input gradient (t*f in the adapters' dtype: peft
    # casts the input to it), under mixed precision (fp32 adapters) both; measured on the reference
    # step for q/k/v/o, gate/up/down and all seven targets, mixed and pure (tests/test_techniques.py)
    t = c.batch * c.seq
    # (a 16-bit block only: the t*h is a norm's fp32 upcast, which an fp32 model does not make)
    # (a fused or compiled norm makes no upcast)
    th = np.where((compute_bytes(c) < FP32) & (c.fused_norm == 0) & (c.compiled == 0), t * c.hidden * compute_bytes(c), 0.0)
    tf_ = t * c.ffn * trainable_bytes(c)
    extra = np.where((c.lora_down == 1) & (c.mixed == 1), tf_ + th, np.maximum(th, c.lora_down * tf_))
    # the re-run layer's dropout and memory-efficient padded mask, alive at both moments
    drop = dropout_layer_bytes(c) + efficient_mask_bytes(c) * (c.recompute_full == 1)
    mlp = mlp + c.lora * extra / c.tp + drop + sac_tail
    softmax = np.where(eager, one_layer + softmax_backward_bytes(c) + drop + sac_tail, 0.0)
    # a quantized base dequantizes the weight of the matmul running (QLoRA)
    return kept, checkpoints, one_layer + mlp + tq.dequant_bytes(c, compute_bytes(c)), softmax, one_layer + drop


def full_recompute_layer_bytes(c: Columns, block: tuple[Array, ...] | None = None,
                               kernel: Array | None = None, window: Array | None = None) -> Array:
    """Full recompute, in the backward of the last block (the first one back-propagated): every
    checkpoint and the block's larger moment (`_recompute_block`), with the LM head's weight
    gradient the only one made yet (the final norm, logits and head cast are freed by then)."""
    kept, _, mlp, softmax, layer = block or _recompute_block(c)
    # the re-run block's math attention keeps its fp32 copies and probabilities too (through its
    # MLP's backward), and its softmax backward adds their gradients (the MLP's tensors freed)
    math_ = math_layer_bytes(c, kernel)
    mlp = mlp + math_
    softmax = np.where(math_ != 0, np.maximum(softmax, layer + math_ + math_softmax_backward_bytes(c)), softmax)
    # (a tied head's share too: it waits in autograd's buffer for the embedding's own)
    head_grad = (1 - c.lora) * c.vocab * c.hidden * trainable_bytes(c) / c.tp
    # accumulating, it is among the gradients already; stepped in the backward, it is gone
    head_grad = np.where((c.grad_accum > 1) | (c.in_backward == 1), 0.0, head_grad)
    # (the re-run block's window call, if any, before anything of the block is saved)
    window = window_call_bytes(c) if window is None else window
    return kept + np.maximum(np.maximum(mlp, softmax), window) + head_grad


def full_recompute_first_block(c: Columns, block: tuple[Array, ...] | None = None
                               ) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """Full recompute, in the backward of the first block (the last one back-propagated): one
    checkpoint is left (the embedding's output), and every other layer's weight gradient is made:
    when a layer's gradients outweigh its checkpoint (full training of any usual size) these are
    the larger moments. ((gradients, activations) at the block's MLP backward, the same at its
    softmax backward.) Gradients not made yet: the untied input embedding's and the block's own
    but its MLP's down projection (at the MLP moment), or those of its q, k, v and first norm (at
    the softmax moment; its MLP, second norm and o_proj are done by then)."""
    kept, checkpoints, mlp, softmax, _ = block or _recompute_block(c)
    first_kept = kept - checkpoints * (c.layers - 1) / c.layers
    updated = np.maximum(updated_params(c), 1.0)
    embedding = (1 - c.tied_embeddings) * embedding_params(c)
    attention = attention_params(c)
    o_proj = c.heads * c.v_head_dim * c.hidden + c.out_bias * c.hidden
    down_share = np.where(c.gated_mlp == 1, 1.0 / 3.0, 0.5)  # down of (gate, up, down) or (up, down)
    pending_mlp = embedding + attention + layer_norm_params(c) + mlp_params(c) * (1 - down_share)
    pending_softmax = embedding + attention - o_proj + norm_params(c, c.hidden)

    def grads(pending: Array) -> Array:
        return gradients_bytes(c) * np.clip(1.0 - (c.lora == 0) * pending / updated, 0.0, 1.0)

    return (grads(pending_mlp), first_kept + mlp), (grads(pending_softmax), first_kept + softmax)


EAGER_BACKWARD_SCORE_TENSORS = 2.0
"""b*a*s^2 gradients alive at the last layer's softmax backward beyond what is saved (those of
the probabilities and of the scores), when the softmax runs in the scores' dtype (GPT-2, BERT).
Measured: 2 errs high on tiny models (+2.7 % to +9.6 %), 1 errs low (-8 % to -20 %); 2 is the
safe side for capacity planning."""


def fp32_softmax(c: Columns) -> Array:
    """Eager attention of a llama-family model: softmax(dtype=float32) then a cast back, as
    transformers writes every modern decoder (measure/models.py, Attention._attend)."""
    return c.family == FAMILY_CODES["llama"]


def eager_backward_bytes(c: Columns, saved: Array | None = None, kernel: Array | None = None,
                         core: tuple[Array, ...] | None = None, head: Array | None = None) -> Array:
    """Eager training, softmax backward of the last layer: everything saved (but the freed
    log-softmax) plus the b*a*s^2 gradients alive there: `EAGER_BACKWARD_SCORE_TENSORS` in the
    compute dtype, or with an fp32 softmax the fp32 gradient of the probabilities and the
    16-bit gradient of the scores it makes. A model, not a fit."""
    plain = (c.recompute_selective == 0) & (c.recompute_full == 0)
    eager = (c.eager_attention == 1) & plain
    # the math kernel's softmax backward: the fp32 gradients of its probabilities and scores
    kernel = sdpa_kernel(c) if kernel is None else kernel
    math_ = (c.eager_attention == 0) & plain & (kernel == MATH_KERNEL) & (c.training == 1) & global_call(c)
    grads = np.where(eager, softmax_backward_bytes(c), math_softmax_backward_bytes(c))
    saved = saved_activations_bytes(c, kernel) if saved is None else saved
    # the loss's and the head's saved tensors are freed by then (`head_saved_bytes`), as are the
    # layer's o_proj's and MLP's; under selective recompute the core is re-run for its backward
    probs, _, post, core_grads, selective = core or attention_core_bytes(c, kernel=kernel)
    kept = saved - (head_saved_bytes(c) if head is None else head) - post
    return np.where(eager | math_, kept + grads, np.where(selective == 1, kept + probs + core_grads, 0.0))


MLP_BACKWARD_GRADIENTS = {"gated": 3.0, "fused_gated": 1.0, "gelu": 2.0}
"""t*f gradients alive at once in the last block's MLP backward (autograd's derivatives,
tools/autograd/derivatives.yaml): a gated MLP's product gradient with the two its `mul` makes
(act's and up's; gate's then replaces the product's); a fused gated kernel writes gate's and up's
into their saved storage (Liger's swiglu backward), the product's gradient alone; a GELU's output
gradient and the one its backward makes."""


def mlp_backward_bytes(c: Columns, saved: Array, head: Array) -> Array:
    """Without recompute, inside the last (dense) block's MLP backward: every saved activation but
    what the head and loss saved (freed by their backward), the gradient flowing into the block
    (t*h in the hidden states' dtype) and the MLP's gradients at their widest
    (`MLP_BACKWARD_GRADIENTS`, a written-out GELU's extra ones too), less the down projection's
    saved input once its backward has run (full training). The peak where the loss is small: Liger's
    fused linear cross-entropy on LoRA (GPT-2, 4 layers, seq 512: backward -4.0 % without it), or
    on BERT (post-norm: the same MLP behind its last norm; bert-base fp16, 3 layers, seq 512,
    batch 8: -3.9 % -> -1.2 %)."""
    on = ((c.training == 1) & (c.recompute_full == 0) & (c.moe_layers == 0)
          & (c.pp == 1))
    if not on.any():
        return np.zeros(len(c))
    t = c.batch * c.seq
    tf = t * c.ffn * linear_out_bytes(c) / c.tp
    gated = c.gated_mlp == 1
    fused = (c.fused_mlp == 1) | (c.compiled == 1)
    n = np.where(gated, np.where(fused, MLP_BACKWARD_GRADIENTS["fused_gated"], MLP_BACKWARD_GRADIENTS["gated"]),
                 MLP_BACKWARD_GRADIENTS["gelu"])
    ops = np.where(~gated & ~fused, written_out_gelu(c), 0.0)
    gelu = gelu_ops_bytes(c, backward=True, ops=ops) - gelu_ops_bytes(c, ops=ops)
    down_input = np.where(c.lora == 0, tf, 0.0)
    return np.where(on, saved - head + hidden_state_bytes(c) + n * tf + gelu - down_input, 0.0)


def mlp_backward_gradients(c: Columns) -> Array:
    """Gradients made by the last block's MLP backward moment (`mlp_backward_bytes`): the head's
    and the down projection's (`last_block_gradients`)."""
    return last_block_gradients(c, c.hidden * c.ffn + c.mlp_bias * c.hidden)


LBAS2 = BASIS.index("Lbas2")
LLINEAR = np.array([n == "Llinear" for n in BASIS], dtype=float)


def attention_core_bytes(c: Columns, index: tuple[Array, ...] | None = None,
                         kernel: Array | None = None) -> tuple[Array, Array, Array, Array, Array]:
    """One layer's attention core where it materialises the b*a*s^2 scores (eager attention, or
    SDPA's math kernel on a global layer), in training (under full recompute only its forward
    transient matters: the re-run block's backward is `full_recompute_layer_bytes`'):
    (what the core keeps for its backward: for eager, the probabilities as it runs them (an fp32
    softmax's output and the 16-bit cast the matmul with V reads; attention sinks' fitted term);
    for the math kernel `math_layer_bytes`;
    its forward transient: eager, the scores (in the matmul's dtype) beside the probabilities or
    beside their scaled / masked copy, whichever is larger (with attention sinks, gpt-oss: the
    masked scores stay referenced while the sink-joined logits, their max-subtracted copy and its
    softmax are made, two of these at a time); the math kernel, its fp32 scores beside what it keeps;
    the layer's t*f share of the saved set, not made yet while its attention runs and freed before
    its attention's backward;
    the gradients alive at the core's softmax backward (`softmax_backward_bytes`,
    `math_softmax_backward_bytes`);
    1 where selective recompute re-runs the core (the reference's `checkpoint(_attend)`,
    Megatron's selective recompute): nothing of it is saved, but it runs in the forward and again
    in the backward (issue 25's random draw: llama3.2-1b fp32 eager at seq 7,808: forward -35 %,
    backward -35 %; gpt-oss-20b fp32 on the math kernel -49 %)).
    Zeros where no row has such a core."""
    zero = np.zeros(len(c))
    trains = c.training == 1
    if not trains.any():
        return zero, zero, zero, zero, zero
    kernel = sdpa_kernel(c) if kernel is None else kernel
    on = trains & (c.eager_attention == 1)
    math_ = trains & (c.eager_attention == 0) & (kernel == MATH_KERNEL) & global_call(c)
    if not (on | math_).any():
        return zero, zero, zero, zero, zero
    idx = _mode_index(c) if index is None else index
    eager_idx = idx[:3] + (np.zeros_like(idx[3]), np.ones_like(idx[4]))
    b = basis_values(c)
    per = c.batch * c.heads * c.seq**2 / c.tp
    cb = plain_matmul_bytes(c)
    # the probabilities one layer keeps, from what it runs (not the table's per-layer average,
    # which a LoRA step's first layer, keeping none, lowers): an fp32 softmax (a llama-family
    # model's softmax(dtype=float32), autocast's fp32 softmax) keeps its fp32 output and the
    # 16-bit cast the matmul with V reads; else the softmax's output in the scores' dtype;
    # attention sinks (gpt-oss) their own fitted term
    upcast = fp32_softmax(c) | autocast(c)
    probs = np.where(upcast, FP32 + np.where(cb < FP32, cb, 0.0), cb) * per
    sinks = (SAVED[eager_idx][..., LBAS2] * b[..., LBAS2] + ext_saved_bytes(c, eager_idx, EXT_SINK_SCORES)) / c.layers
    probs = np.where(c.attention_sinks == 1, sinks, probs)
    # a selectively re-run core keeps its dropout too (`attention_dropout_bytes`, which the saved
    # set holds for a core that is not re-run)
    probs = probs + (c.recompute_selective == 1) * attention_dropout_bytes(c)
    # the scores beside the softmax's transient or the probabilities, whichever is larger
    transient = softmax_transient_bytes(c, cb) * per
    forward = cb * per + np.where(c.attention_sinks == 1, transient, np.maximum(transient, probs))
    kept = math_layer_bytes(c, kernel)
    # the math kernel's forward: its fp32 scores beside what it keeps and the masks it reads, as in
    # a prefill; a re-run block (full recompute) holds its q, k and v there too, saved nowhere else
    qkv = (c.recompute_full == 1) * c.batch * c.seq * (c.heads + 2 * c.kv_heads) * c.head_dim * compute_bytes(c) / c.tp
    math_forward = kept + FP32 * per + math_mask_bytes(c) + qkv
    # the layer after its core: the t*f terms and (under autocast) the 16-bit copies of o_proj
    # and the MLP's matrices (the table's Llinear term, by their share of the block's matrices)
    # (a parallel block, Falcon / GPT-NeoX: its MLP branch is not behind the core; o_proj alone)
    post_share = (c.heads * c.v_head_dim * c.hidden + (c.parallel_block == 0) * mlp_matrices(c, c.ffn)) / block_matrices(c)
    ffn = (SAVED[idx] * b * ((c.parallel_block == 0)[:, None] * FFN_TERM.astype(float) + LLINEAR * post_share[:, None])).sum(axis=-1) / c.layers
    return (np.where(on, probs, np.where(math_, kept, 0.0)),
            np.where(on, forward, np.where(math_, math_forward, 0.0)),
            np.where(on | math_, ffn, 0.0),
            np.where(on, softmax_backward_bytes(c), np.where(math_, math_softmax_backward_bytes(c), 0.0)),
            ((on | math_) & (c.recompute_selective == 1)).astype(float))


EXT_SINK_SCORES = np.array([n == "Lbas2_sink" for n in EXT_BASIS])


def head_saved_bytes(c: Columns, index: tuple[Array, ...] | None = None, ext: tuple | None = None) -> Array:
    """What the final norm, the LM head and the loss save (the table's t*h, t*V and V*h terms:
    the head's input, the fp32 log-softmax, the head weight's 16-bit cast; Liger's fused loss
    saves its gradients instead, `fused_loss_saved_bytes`): made after the last block's forward,
    freed before its backward."""
    idx = _mode_index(c) if index is None else index
    ext = ext_rows(c) if ext is None else ext
    # (the fused loss's weight gradient stays: it becomes the head's gradient)
    fused_grad = np.where((c.fused_loss == 1) & (c.training == 1) & (c.lora == 0),
                          c.vocab * c.hidden * trainable_bytes(c) / c.tp, 0.0)
    return ((SAVED[idx] * basis_values(c) * HEAD_TERMS).sum(axis=-1) + ext_saved_bytes(c, idx, EXT_HEAD_TERMS, ext)
            + fused_loss_saved_bytes(c) - fused_grad)


def fused_loss_cast_bytes(c: Columns, index: tuple[Array, ...] | None = None) -> Array:
    """Liger's fused loss under autocast: the head weight's 16-bit cast (the table's V*h term)
    lives in autocast's cache to the forward's end, and nothing saves it for the backward (the
    kernel made the gradients in the forward): gone when the backward starts. Measured:
    mistral-nemo-12b bf16 mixed, 4 layers, seq 1,440: backward +2.6 % -> +0.4 %."""
    on = (c.fused_loss == 1) & (c.training == 1)
    if not on.any():
        return np.zeros(len(c))
    idx = _mode_index(c) if index is None else index
    return np.where(on, (SAVED[idx] * basis_values(c) * VH_TERM).sum(axis=-1), 0.0)


def core_backward_gradients(c: Columns) -> Array:
    """Gradients made before the last layer's attention core runs its backward (without
    accumulation, which holds every gradient anyway, or a step in the backward, which frees each):
    the LM head's (tied or not; Liger's fused loss made it in the forward: among its saved
    tensors, `head_saved_bytes` leaves it there) and the layer's o_proj, MLP and second
    norm's (a fully trained model; LoRA's adapters are negligible). Measured: mistral-nemo-12b bf16 mixed, selective eager, 4 layers: 2,560 MiB of
    the head and 920 of the layer at that moment."""
    post = (c.heads * c.v_head_dim * c.hidden + c.out_bias * c.hidden
            + (c.parallel_block == 0) * (mlp_params(c) + norm_params(c, c.hidden)))
    return last_block_gradients(c, post)


def last_block_gradients(c: Columns, layer_params: Array) -> Array:
    """Gradients made when the last block's backward has reached a moment: the LM head's (a tied
    head's share waits in autograd's buffer for the embedding's own; Liger's fused loss made it
    among its saved tensors) and `layer_params` of that block, in a fully trained model without
    accumulation (which holds every gradient anyway) or a step in the backward (which frees each)."""
    full = (c.lora == 0) & (c.grad_accum == 1) & (c.in_backward == 0)
    head = (1 - c.fused_loss) * c.vocab * c.hidden
    return np.where(full, (head + layer_params) * trainable_bytes(c) / c.tp, 0.0)


def forward_block_bytes(c: Columns, saved: Array, ext: tuple | None = None, kernel: Array | None = None,
                        core: tuple[Array, ...] | None = None, head: Array | None = None) -> Array:
    """Inside the last block's forward (without full recompute): every block's saved activations
    but the loss's (the final norm's, the log-softmax, the head's cast), the caches the forward
    keeps, and the larger of two transients: a quantized base's dequantized matrix beside the
    whole layer (its MLP's down projection runs last; QLoRA at short sequences, where the logits
    are small: gpt-neox-20b nf4 seq 399, forward -20 %), or the layer's attention core
    (`attention_core_bytes`) before its MLP has saved anything (and, without recompute, before the
    core's own saved tensors are all made)."""
    probs, forward, ffn, _, selective = core or attention_core_bytes(c, kernel=kernel)
    forward = np.where(forward > 0, forward - ffn - (1.0 - selective) * probs, 0.0)
    dequant = tq.dequant_bytes(c, compute_bytes(c))
    on = (c.training == 1) & (c.recompute_full == 0) & ((forward > 0) | (dequant > 0))
    if not on.any():  # (the planner's sdpa rows pay nothing more)
        return np.zeros(len(c))
    kept = saved - (head_saved_bytes(c, ext=ext) if head is None else head) + train_cache_bytes(c)
    return np.where(on, kept + np.maximum(dequant, forward), 0.0)


def dequant_backward_bytes(c: Columns, saved: Array, ext: tuple | None = None, head: Array | None = None) -> Array:
    """A quantized base without full recompute, inside the last block's backward: its MLP's down
    projection dequantizes its weight again for the input's gradient, beside every block's saved
    activations but the loss's (freed by then). (Under full recompute the re-run block counts
    it, `_recompute_block`.) Measured on a cut llama, torchtune's QLoRA at seq 16: -15 % -> -0.1 %."""
    dequant = tq.dequant_bytes(c, compute_bytes(c))
    on = (c.training == 1) & (c.recompute_full == 0) & (dequant > 0)
    if not on.any():
        return np.zeros(len(c))
    return np.where(on, saved - (head_saved_bytes(c, ext=ext) if head is None else head) + dequant, 0.0)


def recompute_forward_block_bytes(c: Columns, kept: Array, kernel: Array | None = None,
                                  core: tuple[Array, ...] | None = None) -> Array:
    """Full recompute, inside the last block's (checkpointed) forward: what is kept so far (`kept`:
    every checkpoint, ids, RoPE tables, masks; autocast's cache of 16-bit weight copies) and the
    largest of a dequantized matrix (QLoRA), the eager (or math) core's forward transient, which
    runs though nothing of it is saved (phi-3-mini LoRA bf16 mixed, eager, seq 4,096, 3 layers:
    forward -69 %), and an MoE layer's dispatched tokens and expert activations."""
    _, core, _, _, _ = core or attention_core_bytes(c, kernel=kernel)
    dequant = tq.dequant_bytes(c, compute_bytes(c))
    # an MoE layer's routed token copies and expert activations (`moe_prefill_bytes`: the same
    # forward, not saved)
    moe = np.where(c.moe_layers > 0, moe_prefill_bytes(c), 0.0)
    mlp = recompute_forward_mlp_bytes(c)
    on = (c.training == 1) & (c.recompute_full == 1) & ((core > 0) | (dequant > 0) | (moe > 0) | (mlp > 0))
    return np.where(on, kept + autocast_cache_bytes(c) + np.maximum(np.maximum(np.maximum(core, dequant), moe), mlp), 0.0)


def recompute_forward_mlp_bytes(c: Columns) -> Array:
    """Full recompute, inside the last (dense) block's checkpointed forward, at its MLP: nothing is
    saved there, so what lives is the block's residual (its input plus the attention's output), the
    norm's output, and the MLP's widest tensors: a gated MLP's act(gate) and up at their product
    (gate itself freed by then), or a fused kernel's gate, up and output; a GELU MLP's up and
    activation, or a written-out activation's live intermediates. The
    peak of a step whose loss is small (Liger's fused linear cross-entropy: the logits never exist)
    under full recompute (traced: llama3.2-1b LoRA liger, 4 layers, seq 512: forward -3.4 % without it)."""
    # (an MoE model's dense layers come first: its last block is an MoE one, `moe_prefill_bytes`)
    on = (c.training == 1) & (c.recompute_full == 1) & (c.moe_layers == 0) & (c.compiled == 0)
    if not on.any():
        return np.zeros(len(c))
    ob = linear_out_bytes(c)
    gated = c.gated_mlp == 1
    # a GELU MLP: up's output beside what the activation holds at its widest, op by op in a
    # forward that saves nothing (each intermediate dies at its last use, in Python's order):
    # one kernel, its output; gelu_fast (0.5 x, x * 0.798, 0.045 x, its product with x): four;
    # gelu_new (0.5 x and two of pow, its scaling, the sum, tanh, 1 + tanh; fp32 from pow on
    # under autocast) and gelu_python (0.5 x, x / sqrt 2, erf, 1 + erf): three
    ops = np.where((c.fused_mlp == 0) & ~gated, written_out_gelu(c), 0.0)
    gelu = np.select([ops == 1, (ops == 2) & autocast(c), ops >= 2], [5.0 * ob, 2.0 * ob + 2.0 * FP32, 4.0 * ob],
                     default=2.0 * ob)
    mlp = np.where(gated, 3.0 * ob, gelu) * c.batch * c.seq * c.ffn / c.tp
    return np.where(on, 2.0 * hidden_state_bytes(c) + mlp, 0.0)


def softmax_backward_bytes(c: Columns) -> Array:
    """The b*a*s^2 gradients alive at one layer's eager softmax backward: with an fp32 softmax the
    fp32 gradient of the probabilities and the 16-bit one of the scores, else
    `EAGER_BACKWARD_SCORE_TENSORS` in the compute dtype."""
    cb = plain_matmul_bytes(c)
    per = np.where(fp32_softmax(c), FP32 + cb, EAGER_BACKWARD_SCORE_TENSORS * cb)
    # gpt-oss's sinks in a 16-bit model (pure, or LoRA's frozen base): the softmax runs in the
    # sink-joined logits' 16-bit dtype, and so do both gradients (transformers' gpt_oss, 8k: the
    # backward +7.1 % -> -2.1 %); trained fp32 sinks under autocast keep the fp32 form above
    per = np.where((c.attention_sinks == 1) & ~(autocast(c) & (c.lora == 0)), EAGER_BACKWARD_SCORE_TENSORS * cb, per)
    return per * c.batch * c.heads * c.seq**2 / c.tp


def train_cache_bytes(c: Columns) -> Array:
    """Training with `workload.use_cache` (transformers' default), while the loss runs: the KV cache
    holds a copy of every layer's K and V (DynamicCache.update concatenates them onto empty tensors
    of K's dtype). Attention reads the copies, so they replace the originals, but under mixed
    precision: RoPE's fp32 tables make K fp32, V is promoted to it, attention saves 16-bit casts of
    both and the cache keeps the fp32 copies. (A 16-bit model, LoRA's 16-bit base, or learned
    positions keep 16-bit K and V: nothing extra.)"""
    # (after prepare_model_for_kbit_training the k and v projections themselves are fp32)
    # (a fused rotary kernel rotates the 16-bit K in place: no fp32 K, nothing extra)
    # (compiled blocks: the cache update is Python the graphs never run; no cache)
    on = ((c.train_cache == 1) & autocast(c) & (((c.lora == 0) & (c.rope_dim > 0) & (c.fused_rope == 0)) | (c.kbit == 1))
          & (c.compiled == 0))
    heads = np.where(c.mla == 1, c.heads, c.kv_heads)
    width = heads * (c.head_dim + c.v_head_dim)
    return np.where(on, c.layers * c.batch * c.seq * width * FP32 / c.tp, 0.0)


def final_hidden_bytes(c: Columns) -> Array:
    """Decoder training, while the loss runs: transformers' model output holds the final norm's
    output (t*h in the hidden dtype). The LM head saves it anyway when it trains in that dtype;
    not under mixed precision (it saves a 16-bit cast of the fp32 state) nor with LoRA (a frozen
    head saves no input)."""
    # (Liger's fused linear cross-entropy saves no input of the head: the output is held beside it)
    on = (c.training == 1) & (c.final_norm == 1) & (autocast(c) | (c.lora == 1) | (c.fused_loss == 1))
    return np.where(on, c.batch * c.seq * c.hidden * hidden_bytes(c), 0.0)


def autocast_cache_bytes(c: Columns) -> Array:
    """Mixed training with full recompute, while the loss runs: autocast keeps a 16-bit copy of
    every fp32 weight it cast until its context ends, and the loss runs inside it (PyTorch's AMP
    recipe; transformers computes it in the model's forward). Without recompute those copies are
    saved for the backward anyway (the tables hold them); with it they are not. One copy of each
    block's matrices (the LM head's is saved, so already counted); LoRA casts only its fp32
    adapters (its frozen base is stored 16-bit), one copy of each: of the stage's blocks under a
    pipeline (the cache ends with each micro-batch's forward)."""
    # (compiled blocks cast their weights inside their graphs, which free each cast at its last use:
    # autocast's cache never sees them)
    on = autocast(c) & (c.recompute_full == 1) & (c.training == 1) & (c.compiled == 0)
    # (an MoE layer's routed experts run outside autocast in their fp32 weights: no copies)
    cast = np.where(c.lora == 1, lora_params(c), autocast_elements(c))
    return np.where(on, cast * 2.0 / c.tp / pipeline_shards(c), 0.0)


def kv_token_bytes(c: Columns) -> Array:
    """KV cache bytes per token and layer of the whole batch: K and V (kv_heads x (head_dim +
    v_head_dim); MLA: the latent kv_lora_rank + rope_head_dim, which every tensor rank keeps whole,
    or the expanded per-head K and V)."""
    per_token = np.where(c.mla == 1,
                         np.where(c.mla_latent_cache == 1, (c.kv_lora_rank + c.rope_head_dim) * c.tp,
                                  c.heads * (c.head_dim + c.v_head_dim)),
                         c.kv_heads * (c.head_dim + c.v_head_dim))
    return c.batch * per_token * kv_element_bytes(c) / c.tp / pipeline_shards(c)


def kv_element_bytes(c: Columns) -> Array:
    """The cache's element: the compute dtype's, or `kv_dtype`'s (fp8 / int8: one byte)."""
    return np.where(c.kv_bytes > 0, c.kv_bytes, compute_bytes(c))


def kv_cache_bytes(c: Columns) -> Array:
    """Decoder inference, after the last decode step: K and V of prompt + generated tokens per
    layer; a local layer keeps its window only. transformers' DynamicCache (and the reference)
    grows by concatenation: a local layer keeps a view of its last window - 1 tokens on the
    window-token storage of its last step."""
    decoder_inference = (c.training == 0) & (c.final_norm == 1)
    tokens = c.seq + c.gen_tokens
    held = (c.layers - c.local_layers) * tokens + c.local_layers * np.minimum(tokens, np.maximum(c.window, 1))
    return np.where(decoder_inference, held * kv_token_bytes(c), 0.0)


def prefill_kv_bytes(c: Columns) -> Array:
    """Decoder inference, during and right after the prefill: every layer holds the prompt's K and
    V, a local layer too (its view of the last window - 1 tokens keeps the whole concatenation's
    storage until its first decode step: DynamicSlidingWindowLayer)."""
    decoder_inference = (c.training == 0) & (c.final_norm == 1)
    return np.where(decoder_inference, c.layers * c.seq * kv_token_bytes(c), 0.0)


def decode_kv_transient_bytes(c: Columns) -> Array:
    """The last decode step, while the last layer grows its cache: the old tensor beside the new
    one. A global layer (DynamicLayer) replaces its keys before it concatenates its values, so the
    old keys (s + g - 1 tokens); a local layer concatenates both first, so its old K and V (the
    prompt's storage when only one token is generated, else its window)."""
    tokens = c.seq + c.gen_tokens
    k_share = np.where((c.mla == 1) & (c.mla_latent_cache == 1), 1.0,
                       c.head_dim / np.maximum(c.head_dim + c.v_head_dim, 1))
    old_local = np.where(c.gen_tokens <= 1, c.seq, np.minimum(tokens - 1, np.maximum(c.window, 1)))
    last_local = c.local_layers == c.layers
    old = np.where(last_local, old_local, k_share * (tokens - 1)) * kv_token_bytes(c)
    return np.where((c.training == 0) & (c.final_norm == 1) & (c.gen_tokens > 0), old, 0.0)


def decode_first_step_kv_bytes(c: Columns) -> Array:
    """The first decode step, in its first layer: every layer still holds what the prefill left
    (`prefill_kv_bytes`: a sliding-window layer's view keeps the whole prompt's storage until its
    own first decode step), and the first layer makes its new K and V: a local layer's of the
    window (DynamicSlidingWindowLayer concatenates, then keeps the last window - 1 tokens), a global
    one's keys of s + 1 tokens. With sliding-window layers and a prompt longer than the window this
    is the decode phase's peak (phi-3-mini at 8k: the last step's was 17.6 % low); a prefill that
    keeps activations beside the same cache is always larger in total."""
    k_share = np.where((c.mla == 1) & (c.mla_latent_cache == 1), 1.0,
                       c.head_dim / np.maximum(c.head_dim + c.v_head_dim, 1))
    new = np.where(c.local_layers > 0, np.minimum(c.seq + 1, np.maximum(c.window, 1)), k_share * (c.seq + 1))
    on = (c.training == 0) & (c.final_norm == 1) & (c.gen_tokens > 0)
    return np.where(on, prefill_kv_bytes(c) + new * kv_token_bytes(c), 0.0)


def inference_ids_bytes(c: Columns) -> Array:
    """int64 token ids (and learned-position ids)."""
    return 8.0 * c.batch * c.seq + c.learned_positions * 8.0 * c.seq


def prefill_embeddings_bytes(c: Columns) -> Array:
    """A decoder's forward holds its input embeddings to its end (transformers' local
    `inputs_embeds`; GPT-2's `position_embeds` too): beyond the first layer, where they are the
    layer's input, one t*h (+ s*h) more in every layer's moments."""
    held = c.batch * c.seq * c.hidden + c.learned_positions * c.seq * c.hidden
    return np.where((c.final_norm == 1) & (c.layers > 1), held * compute_bytes(c) / c.tp, 0.0)


def sdpa_window_mask_bytes(c: Columns) -> Array:
    """sdpa with local layers, a prompt longer than the window: the bool (s, s) sliding-window mask
    transformers builds once per forward (expanded, not copied, over the batch), held to its end."""
    on = (c.eager_attention == 0) & (c.local_layers > 0) & (c.seq > c.window) & (c.final_norm == 1)
    return np.where(on, c.seq**2 * 1.0, 0.0)


def prefill_activations_bytes(c: Columns) -> Array:
    """Inference, inside one layer's MLP (no autograd): the layer's input, the residual stream,
    the normed input and the MLP's intermediates (SwiGLU: gate, act, up, product; GELU: fc out,
    act; GPT-2's gelu_new, computed op by op: fc out, 1 + tanh(.), 0.5 x and their product), + RoPE
    tables, the held embeddings and eager masks. A llama-family GELU written out op by op
    (`model.activation`, transformers' hidden_act) holds more at once, while the caller holds the
    fc output x: gelu_fast (`0.5 * x * (1 + tanh(x * 0.79788 * (1 + 0.044715 * x * x)))`, Python
    evaluates left to right) has 0.5 x, x * 0.79788, 0.044715 x and its product with x alive
    together (5 t*f with x; GPT-NeoX-20B); gelu_new and gelu_python at most three beside x (4)."""
    t = c.batch * c.seq
    cb = compute_bytes(c)
    mlp = np.where(c.gated_mlp == 1, 3.0, np.where(c.family == FAMILY_CODES["gpt2"], 4.0, 2.0)) * c.ffn
    written = np.select([c.gelu_ops == 1, c.gelu_ops > 1], [5.0, 4.0], default=0.0)
    mlp = np.maximum(mlp, np.where(c.family == FAMILY_CODES["llama"], written, 0.0) * c.ffn)
    rope = np.where(c.learned_positions == 1, 0.0, 2.0 * c.seq * c.rope_dim * cb)
    dense = t * (3.0 * c.hidden + mlp) * cb / c.tp
    # GPT-2's block keeps its eager attention weights (b*a*s^2) to its end (transformers' GPT2Block)
    gpt2_weights = np.where((c.family == FAMILY_CODES["gpt2"]) & (c.eager_attention == 1),
                            c.batch * c.heads * c.seq**2 * cb / c.tp, 0.0)
    held = prefill_embeddings_bytes(c) + eager_mask_bytes(c) + sdpa_window_mask_bytes(c) + gpt2_weights
    # a quantized layer dequantizes its weight beside what the matmul reads and writes: a gated
    # MLP's up projection (the gate's activation alive, the up output made: 2 t*f), a GELU MLP's
    # down projection (its input and the t*h output)
    at_matmul = np.where(c.gated_mlp == 1, 2.0 * c.ffn, c.ffn + c.hidden)
    dequant = np.maximum(0.0, tq.dequant_bytes(c, cb) + t * (at_matmul * cb - mlp * cb) / c.tp)
    return (np.where(c.moe_layers > 0, moe_prefill_bytes(c), dense + dequant) + rope + held
            + inference_ids_bytes(c))


def moe_prefill_bytes(c: Columns) -> Array:
    """Inference inside an MoE layer (the last layer of an MoE model): the residual and its normed
    copy, the router's logits and fp32 probabilities (t*E), top-k weights and int64 indices with
    the sort order and token map (t*k), and the grouped token copies (t*k + padding rows) with
    four expert activations each (gate, act, up, product) and the shared experts' MLP."""
    t = c.batch * c.seq
    cb = compute_bytes(c)
    copies = t * c.experts_per_token + moe_padding(c)
    n_act = np.where(c.gated_mlp == 1, 4.0, 2.0)
    router = t * c.experts * (cb + FP32) + t * c.experts_per_token * (cb + 3 * 8.0)
    experts = copies * (c.hidden + n_act * c.expert_ffn) * cb / c.ep
    shared = t * np.where(c.gated_mlp == 1, 3.0, 2.0) * c.shared_ffn * cb
    return (t * 3.0 * c.hidden * cb + router + experts + shared) / c.tp


def prefill_attention_bytes(c: Columns, kernel: Array | None = None, window: Array | None = None) -> Array:
    """Eager inference, inside one layer's softmax: the masked scores and the probabilities
    (b*a*s^2 each; a llama-family model's softmax runs in fp32 on an fp32 copy of 16-bit scores,
    so the copy and the fp32 probabilities), the model's float masks (`eager_mask_bytes`), and
    six t*h tensors (the held embeddings among them) (residual, normed input, q, K and V repeated to all heads, the QK
    operand). sdpa never holds s^2: its MLP moment is larger."""
    t = c.batch * c.seq
    cb = compute_bytes(c)
    # (inference runs no autocast: an fp32 softmax is a llama-family model's, sinks are 16-bit)
    probs = softmax_transient_bytes(c, cb)
    eager = (t * 6.0 * c.hidden * cb + c.batch * c.heads * c.seq**2 * (cb + probs)) / c.tp + eager_mask_bytes(c)
    rope = np.where(c.learned_positions == 1, 0.0, 2.0 * c.seq * c.rope_dim * cb)
    # SDPA's math kernel (fp32 GQA, transformers' Falcon), inside its softmax: the fp32 scores and
    # probabilities (b*a*s^2 each), the causal mask it builds (bool, then its fp32 additive copy),
    # Falcon's own bool mask (b*s^2) with its additive copy in the compute dtype
    kernel = sdpa_kernel(c) if kernel is None else kernel
    math_ = (c.eager_attention == 0) & (kernel == MATH_KERNEL) & global_call(c)
    masks = math_mask_bytes(c)
    math_bytes = (t * 6.0 * c.hidden * cb + c.batch * c.heads * c.seq**2 * 2 * FP32) / c.tp + masks
    # a window call, beside the residual, the held embeddings and the bool window mask
    windowed = window_call_bytes(c) if window is None else window
    held = 2.0 * t * c.hidden * cb / c.tp + sdpa_window_mask_bytes(c) + rope + inference_ids_bytes(c)
    return np.where(c.eager_attention == 1, eager + rope + inference_ids_bytes(c),
                    np.maximum(np.where(math_, math_bytes + rope + inference_ids_bytes(c), 0.0),
                               np.where(windowed > 0, windowed + held, 0.0)))


def window_call_bytes(c: Columns) -> Array:
    """Inside a sliding-window layer's SDPA call past its window (0 elsewhere), what the call and
    its layer make: the additive (b, 1, s, s) copy of the bool window mask in the query's dtype,
    made through a bool `logical_not` of that size (`convert_boolean_attn_mask`), on the
    memory-efficient kernel its padded expansion (`efficient_mask_bytes`, made while the additive
    copy lives), and four t*h tensors (normed input, q, K and V repeated to every head; under GQA
    their own K and V too). Beside what is held (the residual, the embeddings, the bool mask): a
    prefill's attention moment, and a recomputing forward's (whose blocks keep nothing else)."""
    on = (c.eager_attention == 0) & (c.local_layers > 0) & (c.seq > c.window)
    if not on.any():
        return np.zeros(len(c))
    padded = efficient_mask_bytes(c)
    additive = c.batch * c.seq**2 * sdpa_input_bytes(c)
    conversion = np.maximum(c.batch * c.seq**2 * 1.0, np.where(padded > 0, padded + additive, 0.0))
    # GQA: a masked call gets K and V repeated to every head, beside their own (rotated) K and V
    # (in a prefill those are the cache's)
    kv = np.where((c.kv_heads < c.heads) & (c.training == 1), 2.0 * c.kv_heads * c.head_dim, 0.0)
    inside = (c.batch * c.seq * (4.0 * c.hidden + kv) * compute_bytes(c) / c.tp + additive + conversion)
    return np.where(on, inside, 0.0)


def decode_activations_bytes(c: Columns, kernel: Array | None = None) -> Array:
    """Decode, last step, in the last layer: eager GQA repeats the cached K and V to all heads
    (b*a*S*d each, S: s + g tokens, a local layer's window); sdpa shares them (`enable_gqa`: one
    token needs no mask) unless its head sizes rule that out (transformers' `use_gqa_in_sdpa`)."""
    repeats = (c.kv_heads != c.heads) & ((c.eager_attention == 1) | (c.head_dim > 256) | (c.v_head_dim != c.head_dim))
    tokens = c.seq + c.gen_tokens
    seen = np.where(c.local_layers == c.layers, np.minimum(tokens, np.maximum(c.window, 1)), tokens)
    per_head = c.batch * seen * c.heads * c.head_dim / c.tp
    # SDPA's math kernel (fp32 GQA): it repeats the cached K and V to every head itself (under
    # enable_gqa) and scales K by sqrt(scale) (a new tensor), all in fp32 (`math_layer_bytes`);
    # measured on a cut llama at fp32: decode -13 % -> 0
    kernel = sdpa_kernel(c) if kernel is None else kernel
    # (measured for fp32 under enable_gqa; a model that passes its own mask, Falcon, expands K and
    # V itself and keeps the decode step's earlier form)
    math_ = ((c.eager_attention == 0) & (kernel == MATH_KERNEL) & (c.training == 0) & (compute_bytes(c) == FP32)
             & (c.sdpa_mask == 0))
    math_bytes = FP32 * per_head * (1.0 + 2.0 * (c.kv_heads != c.heads))
    return np.where(math_, math_bytes, np.where(repeats, 2.0 * per_head * compute_bytes(c), 0.0))


def inference_logits_bytes(c: Columns) -> Array:
    """Inference logits: a decoder keeps the last position only (b*V; transformers >= 4.45); an
    encoder (bert) all t*V; `workload.prefill_logits=all` the whole prompt's t*V and their fp32
    copy (older transformers' `logits.float()`)."""
    cb = compute_bytes(c)
    t_v = c.batch * c.seq * c.vocab
    return np.where(c.prefill_all_logits == 1, t_v * (cb + np.where(cb < FP32, FP32, 0.0)),
                    np.where(c.final_norm == 1, c.batch * c.vocab, t_v) * cb)


# --- moments ----------------------------------------------------------------------------------

TRAIN_PHASES = ("forward", "fsdp_forward_start", "fsdp_forward_block", "forward_window_call", "forward_block", "loss", "head_backward", "head_grad_cast", "head_step",
                "backward_recompute", "fsdp_backward_block", "fsdp_backward_block_end", "backward_first_block", "backward_first_block_softmax", "attention_backward",
                "dequant_backward", "mlp_backward", "embedding_backward", "optimizer_step")
"""The training moments `peak_breakdown` takes the largest of, by the name a result row's
`peak_phase` gives the winner (docs/formulas.md, "Moments"): the forward's end (inside the loss,
the logits alive); FSDP2's first and last block all-gathers (`fsdp_gathered`); under recompute, inside a sliding-window layer's SDPA call (`window_call_bytes`);
inside the last block's forward (an attention core that materialises its scores, a dequantized
matrix: `forward_block_bytes`, `recompute_forward_block_bytes`); the backward's start (the logits' gradient); three moments of the LM head's backward (its matmul;
the fp32 gradient made from the 16-bit cast's; stepped there); a recomputed block; the first
block's backward under full recompute (at its MLP, then at its softmax); the last layer's eager
(or math, or selectively re-run) softmax backward; a quantized base's dequantized matrix in the
last block's backward; a tied embedding's end of backward; the optimizer step."""
INFERENCE_PHASES = ("prefill", "prefill_logits", "prefill_scores", "decode", "decode_gqa_repeat", "decode_dequant",
                    "decode_first_step")
"""Inference moments: inside a prefill layer's MLP; the LM head's logits; an eager prefill's
scores; the last decode step growing the cache; its repeated GQA keys and values; a quantized
model's dequantized matrix beside the whole cache; the first decode step, while sliding-window
layers still hold the whole prompt's storage (`decode_first_step_kv_bytes`)."""
SERVE_PHASE = "serve_profile"
"""A serving engine's rows: its profile run and the paged KV cache of `batch` sequences."""
PHASES = (*TRAIN_PHASES, *INFERENCE_PHASES, SERVE_PHASE)


def whole_embedding_gradient_bytes(whole: Columns, rank: Columns) -> Array:
    """torch's tensor parallel (DTensor, `parallel.stack=fsdp`): the vocabulary-sharded embedding's
    gradient comes out of `embedding_dense_backward` replicated, all V x h rows on every rank (its
    sharding rule for a replicated gradient output, as traced on torch 2.13), so a rank holds
    (V - V / tp) x h more than its shard from the embedding's backward to the step. Megatron's
    VocabParallelEmbedding (`stack=deepspeed` here) keeps the shard's only. Tied to the head, the
    whole gradient is summed into the head's sharded one, which stays a shard."""
    on = ((whole.tp > 1) & (whole.deepspeed == 0) & (whole.training == 1) & (whole.lora == 0)
          & (whole.in_backward == 0) & (whole.tied_embeddings == 0))
    # (in the dtype the gradient is made: the 16-bit param_dtype's under FSDP2's MixedPrecisionPolicy)
    return np.where(on, (whole.vocab - rank.vocab) * whole.hidden * gathered_element_bytes(whole), 0.0)


def loss_parallel_bytes(whole: Columns, rank: Columns) -> Array:
    """torch's `loss_parallel` cross-entropy over vocabulary-sharded logits (DTensor, `stack=fsdp`;
    torch/distributed/tensor/parallel/loss.py) writes one t x V / tp fp32 tensor more than
    ATen's fused kernels, forward and backward: its log-softmax keeps `x - max` beside the exp it
    sums and the result; its backward builds the gradient from a zeros tensor, exp(x), their sum
    and the product (four beside the saved log-softmax, where ATen's two kernels write three)."""
    on = ((whole.tp > 1) & (whole.deepspeed == 0) & (whole.training == 1) & (whole.loss_chunks <= 1)
          & (whole.fused_loss == 0) & ~logits_kept(whole))
    return np.where(on, rank.batch * rank.seq * rank.vocab * FP32, 0.0)


def sequence_parallel_saving_bytes(whole: Columns, rank: Columns) -> Array:
    """What sequence parallel (Korthikanti et al. 2022, sec. 4.2.2; DTensor's SequenceParallel as
    traced) takes off a tensor-parallel rank's saved set (`tensor_rank`): every norm runs on its
    1/tp of the tokens, so what a norm saves for its own backward shrinks tp-fold: an RMSNorm's
    fp32 input (x.float()) and statistics, and its 16-bit normalised input (saved for the weight's
    gradient; DTensor's product saves it on the shard even beside a frozen weight); a LayerNorm's
    input and statistics. The norm's output is all-gathered for the projections after it, and that
    whole copy is what they save: unchanged. The final norm's output is whole only when the head
    trains (its input saved); a frozen head keeps its shard. With full recompute the checkpointed
    block inputs (the residual stream) are shards. A LoRA model's first norm saves nothing for
    itself (its input, the frozen embedding's output, needs no gradient)."""
    on = (whole.tp > 1) & (whole.sequence_parallel == 1) & (whole.training == 1)
    if not on.any():
        return np.zeros(len(whole))
    keep = 1.0 - 1.0 / whole.tp
    t, h, hb = rank.batch * rank.seq, rank.hidden, hidden_bytes(rank)
    rms = rank.layer_norm == 0
    own = np.where(rms, FP32 * t * h + FP32 * t, hb * t * h + 2 * FP32 * t)  # a norm's input-side tensors
    full = rank.recompute_full == 1
    norms = np.where(full, 0.0, rank.layers * rank.block_norms) + rank.final_norm
    inputs = norms - np.where(full, 0.0, rank.lora)
    y = np.where(rms, np.where(rank.lora == 0, keep, -1.0 / whole.tp) * norms * t * h * hb, 0.0)
    final_out = rank.lora * rank.final_norm * keep * t * h * hb
    checkpoints = np.where(full, keep * rank.layers * t * h * hb, 0.0)
    return np.where(on, keep * inputs * own + y + final_out + checkpoints, 0.0)


def tensor_rank(c: Columns) -> Columns:
    """A tensor-parallel rank as the model it runs (Megatron-LM, Shoeybi et al. 2019; DTensor's
    `parallelize_module` as measure/parallel.py applies it): q, k, v, gate, up and the LM head
    column-wise, o and down row-wise, the embedding over the vocabulary, so a rank holds heads /
    tp, kv_heads / tp, ffn / tp (an expert's too) and ceil(vocab / tp) rows of the embedding and
    head, while the norms and every token x hidden tensor between the projections (a norm's
    input and output, the residual stream, the head's input) stay whole: the rows of a model of
    those widths with tp = 1. Its LoRA adapters are the shards' own (B split beside a column-wise
    weight, A beside a row-wise one). Every term of one GPU's estimate then holds per rank."""
    on = c.tp > 1
    if not on.any():
        return c

    def split(x: Array) -> Array:
        return np.where(on, x / c.tp, x)

    return replace(c, heads=split(c.heads), kv_heads=np.maximum(split(c.kv_heads), 1.0), ffn=split(c.ffn),
                   expert_ffn=split(c.expert_ffn), shared_ffn=split(c.shared_ffn),
                   vocab=np.where(on, np.ceil(c.vocab / c.tp), c.vocab), tp=np.ones_like(c.tp))


def _moments(c: Columns, k: DetailedConstants) -> tuple[list[Breakdown], list[Breakdown], Breakdown | None]:
    """Every moment's breakdown: the training ones (in TRAIN_PHASES' order), the inference ones
    (INFERENCE_PHASES'), and the serving engine's (None when no row serves). `peak_breakdown`
    and `peak_phase` both take the first largest of each list, so they agree by construction."""
    whole, c = c, tensor_rank(c)
    w_step = k.weights_factor * weights_bytes(c)
    w = w_step + k.weights_factor * gathered_layer_bytes(c)  # in the forward and backward
    sharded = fsdp(c)
    units = fsdp_units(c, sharded)
    fs = {name: w + k.weights_factor * x for name, x in fsdp_gathered(c, units).items()}  # FSDP2's, per moment
    o = k.optimizer_factor * optimizer_bytes(c)
    # stepped in the backward, no gradient set ever exists: the backward's moments hold one
    # parameter's gradient and step temporaries instead (`in_backward_bytes`)
    in_bwd = c.in_backward == 1
    # torch's tensor parallel: the embedding's gradient whole on every rank, kept to the step;
    # under FSDP2 too until the root's reduce-scatter (then a shard, as every gradient)
    whole_grad = k.gradients_factor * whole_embedding_gradient_bytes(whole, c)
    g = np.where(in_bwd, 0.0, k.gradients_factor * gradients_bytes(c) + np.where(sharded, 0.0, whole_grad))
    # accumulating micro-batches: from the second one on, every gradient is alive throughout
    g_acc = np.where(c.grad_accum > 1, g, 0.0)
    g_bwd = k.gradients_factor * in_backward_bytes(c) + g_acc  # inside a block's backward
    overhead = np.full_like(w, k.overhead_bytes)
    inputs = 16.0 * c.batch * c.seq  # token ids and targets (int64)
    act = k.activations_factor
    lg = k.logits_factor
    loss_parallel = loss_parallel_bytes(whole, c)
    # the step takes the whole embedding gradient's shard for its parameter (DTensor redistributes
    # it: a copy), alive while no other step temporary is
    whole_gradient_shard = np.where((whole_grad > 0) & ~sharded, c.vocab * c.hidden * trainable_bytes(c), 0.0)
    # FSDP2 takes that shard (a copy) for the root's reduce-scatter beside the whole one
    whole_grad_end = whole_grad + np.where(whole_grad > 0, k.gradients_factor * c.vocab * c.hidden * gathered_element_bytes(c), 0.0)
    ext = ext_rows(c)  # once: the saved set and the re-run block both read it
    # each computed once: the planner evaluates millions of rows
    kernel = sdpa_kernel(c)  # once: several moments read it
    sac = per_op_sac_bytes(c, kernel)  # (recompute=op) the saved set and the re-run block both read it
    block = _recompute_block(c, ext, sac)
    offloaded = offloaded_checkpoint_bytes(c, block)
    # a pipeline stage keeps its micro-batches in flight (1F1B): the whole model's one micro-batch
    # when pp divides the layers, less on an uneven split (`in_flight_layers`)
    in_flight = np.where((c.pp > 1) & (c.training == 1), in_flight_layers(c) / c.layers, 1.0)
    stage_saved = saved_activations_bytes(c, kernel, ext, sac) - offloaded - sequence_parallel_saving_bytes(whole, c)
    saved_bytes = in_flight * stage_saved
    saved = act * saved_bytes
    # the attention core and what the head saved: three moments read each
    core = attention_core_bytes(c, kernel=kernel)
    head_saved = head_saved_bytes(c, ext=ext)
    block_now = (in_flight * (block[0] - offloaded), *block[1:])  # the last block's backward: two checkpoints back
    head = head_backward_bytes(c, saved_bytes)
    window = window_call_bytes(c)
    recomputing = (c.recompute_full == 1) | (c.recompute_selective == 1)
    kept_so_far = np.where(c.recompute_full == 1, block_now[0], saved_bytes)
    end_grads, end_acts = embedding_end_bytes(c, g, inputs)
    # FSDP2: a block's unsharded gradients exist until its reduce-scatter (the head's to the end)
    fsdp_head_grads, root_grads, root_reduce = fsdp_root_gradients(c, sharded)
    # (the root's own gradient shards come out of that reduce-scatter: not yet made at it)
    root_shards = np.where(in_bwd, 0.0, tq.root_params(c) * (c.lora == 0) * sharded * trainable_bytes(c) / c.tp / c.dp)
    block_grads = units[2] + fsdp_head_grads
    # one block into FSDP2's backward (the last one's reduce-scatter input beside the rest), at its
    # start and at its end (its own gradients made, its saved activations used)
    after_head = fsdp_backward_saved(c, saved) if sharded.any() else np.zeros(len(c))
    one_in = np.where(c.recompute_full == 1, kept_so_far, after_head * (c.layers - 1) / c.layers)
    two_in = np.where(c.recompute_full == 1, kept_so_far, after_head * (c.layers - 2) / c.layers)
    train = [
        Breakdown.of(w, weights=fs["loss"], optimizer=o, gradients=g_acc,
                     activations=saved + act * (autocast_cache_bytes(c) + train_cache_bytes(c)
                                                + final_hidden_bytes(c)),
                     logits=lg * (live_logits_bytes(c) + final_softcap_bytes(c) + loss_parallel), overhead=overhead),
        # FSDP2's forward: the first block's all-gather beside the root's output, then the last
        # block's (every other block's saved activations kept)
        Breakdown.of(w, weights=np.where(sharded, fs["forward_start"], 0.0), optimizer=o * sharded,
                     gradients=g_acc * sharded, overhead=overhead * sharded, activations=inputs * sharded),
        Breakdown.of(w, weights=np.where(sharded, fs["forward_block"], 0.0), optimizer=o * sharded,
                     gradients=g_acc * sharded, overhead=overhead * sharded,
                     # (under autocast with full recompute its cache of every earlier block's
                     # 16-bit weight copies, as at the loss: `autocast_cache_bytes`)
                     activations=sharded * (saved + act * autocast_cache_bytes(c)) * (c.layers - 1) / c.layers),
        # recomputing, the blocks keep nothing else: what is kept so far and a window call's masks
        Breakdown.of(w, weights=w, optimizer=o, gradients=g_acc, overhead=overhead,
                     activations=act * np.where(recomputing & (window > 0), kept_so_far + window, 0.0)),
        # inside the last block's forward: a dequantized matrix, an eager (or math) core; under
        # full recompute beside what is kept so far (every checkpoint, autocast's cache)
        Breakdown.of(w, weights=w, optimizer=o, gradients=g_acc, overhead=overhead,
                     activations=act * np.where(c.recompute_full == 1, recompute_forward_block_bytes(c, block_now[0], kernel, core),
                                                in_flight * forward_block_bytes(c, stage_saved, ext, kernel, core, head_saved))),
        Breakdown.of(w, weights=fs["loss"], optimizer=o, activations=saved - act * in_flight * fused_loss_cast_bytes(c),
                     logits=lg * (logits_gradient_bytes(c) + final_softcap_bytes(c) + loss_parallel),
                     gradients=g_acc, overhead=overhead),
        *(Breakdown.of(w, weights=fs["head"], optimizer=o, activations=act * head_acts,
                       gradients=k.gradients_factor * head_grads + g_acc, overhead=overhead)
          for head_acts, head_grads in head),
        # (the re-run block's term holds the gradients made so far: the head's, FSDP2's too)
        Breakdown.of(w, weights=fs["last_block"], optimizer=o, gradients=g_bwd,
                     activations=act * full_recompute_layer_bytes(c, block_now, kernel, window) * c.recompute_full, overhead=overhead),
        *(Breakdown.of(w, weights=np.where(sharded, fs["block"], 0.0), optimizer=o * sharded, overhead=overhead * sharded,
                       gradients=sharded * (g_acc + grads), activations=sharded * acts)
          for grads, acts in ((fsdp_head_grads, one_in), (block_grads, two_in))),
        *(Breakdown.of(w, weights=fs["first_block"], optimizer=o,
                       gradients=np.where(in_bwd | (c.grad_accum > 1), g_bwd, k.gradients_factor * grads) * c.recompute_full
                       + block_grads * c.recompute_full,
                       activations=act * first * c.recompute_full, overhead=overhead)
          for grads, first in full_recompute_first_block(c, block)),
        Breakdown.of(w, weights=fs["last_block"], optimizer=o, activations=act * eager_backward_bytes(c, saved_bytes, kernel, core, head_saved),
                     gradients=g_acc + block_grads + k.gradients_factor * np.where(sharded, 0.0, core_backward_gradients(c)),
                     overhead=overhead),
        Breakdown.of(w, weights=fs["last_block"], optimizer=o, overhead=overhead, gradients=g_acc + block_grads,
                     activations=act * in_flight * dequant_backward_bytes(c, stage_saved, ext, head_saved)),
        # without recompute, the last block's MLP backward: its gradients beside every saved activation
        Breakdown.of(w, weights=fs["last_block"], optimizer=o, overhead=overhead,
                     gradients=g_acc + block_grads + k.gradients_factor * np.where(sharded, 0.0, mlp_backward_gradients(c)),
                     activations=act * mlp_backward_bytes(c, saved_bytes, head_saved)),
        # FSDP2: the embedding's backward beside the gathered root, then the root's reduce-scatter
        # input once it has resharded (post_backward reshards before it reduces), whichever is larger
        Breakdown.of(w, weights=np.where(sharded, np.maximum(fs["end"], w + k.weights_factor * root_reduce), w), optimizer=o,
                     gradients=k.gradients_factor * np.where(sharded, g - root_shards + root_grads, end_grads)
                     + sharded * whole_grad_end,
                     activations=act * end_acts, overhead=overhead),
        Breakdown.of(w, weights=w_step, optimizer=o, optimizer_step=k.optimizer_step_factor * np.maximum(optimizer_step_temporary_bytes(c), whole_gradient_shard),
                     gradients=g, activations=np.full_like(w, 1.0) * inputs, overhead=overhead),
    ]
    buckets = k.gradients_factor * ddp_bucket_bytes(c)
    if buckets.any():  # DDP's buckets: from the wrap on, in every moment of the step
        train = [replace(b, gradients=b.gradients + np.where(b.total > 0, buckets, 0.0)) for b in train]
    kv = k.kv_cache_factor * prefill_kv_bytes(c)
    kv_decode = k.kv_cache_factor * kv_cache_bytes(c)
    infer = [
        Breakdown.of(w, weights=w, kv_cache=kv, activations=act * prefill_activations_bytes(c), overhead=overhead),
        Breakdown.of(w, weights=w, kv_cache=kv, logits=lg * inference_logits_bytes(c),
                     activations=act * (c.batch * c.seq * c.hidden * compute_bytes(c) + inference_ids_bytes(c)),
                     overhead=overhead),
        Breakdown.of(w, weights=w, kv_cache=kv, activations=act * prefill_attention_bytes(c, kernel, window), overhead=overhead),
        Breakdown.of(w, weights=w, kv_cache=kv_decode + k.kv_cache_factor * decode_kv_transient_bytes(c),
                     overhead=overhead),
        Breakdown.of(w, weights=w, kv_cache=kv_decode, activations=act * decode_activations_bytes(c, kernel),
                     overhead=overhead),
        # a quantized model's last decode step dequantizes its largest matrix beside the whole cache
        Breakdown.of(w, weights=w, kv_cache=kv_decode, overhead=overhead,
                     activations=act * tq.dequant_bytes(c, compute_bytes(c)) * (c.gen_tokens > 0)),
        Breakdown.of(w, weights=w, kv_cache=k.kv_cache_factor * decode_first_step_kv_bytes(c), overhead=overhead),
    ]
    serve = None
    if (c.serve == 1).any():
        serve = Breakdown.of(w, weights=w, activations=act * serve_activation_bytes(c),
                             kv_cache=k.kv_cache_factor * serve_kv_bytes(c), overhead=overhead + c.graph_bytes)
    return train, infer, serve


def _largest(moments: list[Breakdown]) -> Breakdown:
    """Element-wise the first moment of the largest total (a later one wins only when larger)."""
    out = moments[0]
    for m in moments[1:]:
        out = m.select(m.total > out.total, out)
    return out


def peak_breakdown(c: Columns, k: DetailedConstants) -> Breakdown:
    """The largest moment; the breakdown reported is that moment's."""
    train, infer, serve = _moments(c, k)
    out = _largest(train).select(c.training == 1, _largest(infer))
    return out if serve is None else serve.select(c.serve == 1, out)


def peak_phase(c: Columns, k: DetailedConstants = DetailedConstants()) -> np.ndarray:
    """Per row, the name of the moment `peak_breakdown` reports (PHASES): the first of the
    largest total, as `_largest` picks it."""
    return moment_report(c, k)[0]


MEASURED_PHASES = ("forward", "backward", "optimizer", "prefill", "decode")
"""The phases a measurement reports a peak of (`measured_<phase>_peak_bytes`: the tracker's sections
in measure/workloads.py). Training: forward (the forward and the loss), backward (from the loss's
backward to the last gradient: recomputation and in-backward steps included), optimizer (step
and zero_grad); inference: prefill (the cache's allocation and the prompt), decode."""
PHASE_OF_MOMENT = {
    "forward": "forward", "fsdp_forward_start": "forward", "fsdp_forward_block": "forward",
    "forward_window_call": "forward", "forward_block": "forward", "loss": "backward", "head_backward": "backward",
    "head_grad_cast": "backward",
    "head_step": "backward", "backward_recompute": "backward", "fsdp_backward_block": "backward",
    "fsdp_backward_block_end": "backward", "backward_first_block": "backward",
    "backward_first_block_softmax": "backward", "attention_backward": "backward", "dequant_backward": "backward", "mlp_backward": "backward",
    "embedding_backward": "backward",
    "optimizer_step": "optimizer", "prefill": "prefill", "prefill_logits": "prefill", "prefill_scores": "prefill",
    "decode": "decode", "decode_gqa_repeat": "decode", "decode_dequant": "decode", "decode_first_step": "decode",
}
"""Each moment's measured phase: the "loss" moment (the logits' gradient) is the first of backward."""


def phase_peaks(c: Columns, k: DetailedConstants = DetailedConstants()) -> dict[str, Array]:
    """Per measured phase (MEASURED_PHASES), the largest of its moments' totals, so each phase of
    the estimate stands next to its measured peak (a right total over a wrong forward shows);
    NaN where a row has no such phase (training rows: prefill and decode; inference and serving
    rows: the training phases; serving rows: every phase, their peak is the engine's profile)."""
    return moment_report(c, k)[1]


def moment_report(c: Columns, k: DetailedConstants = DetailedConstants()) -> tuple[np.ndarray, dict[str, Array]]:
    """(`peak_phase`, `phase_peaks`) from one evaluation of the moments (a sweep reports both)."""
    train, infer, serve = _moments(c, k)
    assert len(train) == len(TRAIN_PHASES) and len(infer) == len(INFERENCE_PHASES)  # named in that order
    train_totals, infer_totals = np.stack([m.total for m in train]), np.stack([m.total for m in infer])
    names = np.where(c.training == 1, np.asarray(TRAIN_PHASES, dtype=object)[np.argmax(train_totals, axis=0)],
                     np.asarray(INFERENCE_PHASES, dtype=object)[np.argmax(infer_totals, axis=0)])
    if serve is not None:
        names = np.where(c.serve == 1, SERVE_PHASE, names)
    peaks = {phase: np.full(np.shape(c.batch), -np.inf) for phase in MEASURED_PHASES}
    for name, total in zip((*TRAIN_PHASES, *INFERENCE_PHASES), (*train_totals, *infer_totals)):
        phase = PHASE_OF_MOMENT[name]
        peaks[phase] = np.maximum(peaks[phase], total)
    training, serving = c.training == 1, c.serve == 1
    for phase, value in peaks.items():
        applies = training if phase in ("forward", "backward", "optimizer") else ~training
        if phase == "decode":
            applies = applies & (c.gen_tokens > 0)
        peaks[phase] = np.where(applies & ~serving & np.isfinite(value), value, np.nan)
    return names, peaks


# --- serving (vLLM) ---------------------------------------------------------------------------

def serve_profile_columns(c: Columns) -> Columns:
    """The engine's profile run: one forward of `max_batched_tokens` tokens (chunked prefill, flash
    attention, no cache) that keeps the last position's logits."""
    from dataclasses import replace
    return replace(c, batch=np.ones_like(c.batch), seq=c.max_batched_tokens, eager_attention=np.zeros_like(c.batch),
                   gen_tokens=np.zeros_like(c.batch), prefill_all_logits=np.zeros_like(c.batch))


def serve_activation_bytes(c: Columns) -> Array:
    """vLLM sizes its KV cache after profiling a dummy forward of `max_batched_tokens` tokens (its
    activation peak: `prefill_activations_bytes` of one such sequence) and a dummy sampler step
    over `max_seqs` rows (`SAMPLER_FP32_TENSORS` fp32 (max_seqs, V) tensors); the larger counts."""
    p = serve_profile_columns(c)
    forward = np.maximum(prefill_activations_bytes(p), p.seq * p.hidden * compute_bytes(p) + inference_ids_bytes(p))
    sampler = tq.SAMPLER_FP32_TENSORS * c.max_seqs * c.vocab * FP32 / c.tp
    return np.where(c.serve == 1, np.maximum(forward, sampler), 0.0)


def serve_kv_sequence_bytes(c: Columns) -> Array:
    """The paged KV cache of one sequence of `seq` tokens: whole blocks of `block_size` tokens per
    layer; a sliding-window layer keeps the blocks of its window only (vLLM's sliding-window spec)."""
    blocks = np.ceil(c.seq / np.maximum(c.block_size, 1.0))
    local = np.ceil(np.minimum(c.seq, np.maximum(c.window, 1.0)) / np.maximum(c.block_size, 1.0))
    per_layer_token = kv_token_bytes(c) / np.maximum(c.batch, 1.0)
    return ((c.layers - c.local_layers) * blocks + c.local_layers * local) * c.block_size * per_layer_token


def serve_kv_bytes(c: Columns) -> Array:
    """`batch` concurrent sequences of `seq` tokens in the paged cache."""
    return np.where(c.serve == 1, c.batch * serve_kv_sequence_bytes(c), 0.0)


def serve_kv_token_bytes(c: Columns) -> Array:
    """KV cache bytes per token, all layers (what vLLM's "GPU KV cache size: N tokens" divides by)."""
    return c.layers * kv_token_bytes(c) / np.maximum(c.batch, 1.0)
