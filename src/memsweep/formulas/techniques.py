"""The memory techniques of real fine-tuning and serving stacks (issue 13), as `detailed` models them.

Each is a mechanism with its constants cited; docs/formulas.md ("Techniques") explains each, and
tests/test_techniques.py checks each against its source's numbers and against the reference step
traced under fake tensors where it runs on a CPU.

- quantized frozen weights (QLoRA's NF4 base, LLM.int8(), GPTQ / AWQ checkpoints): bytes of the
  block matrices as the libraries store them; embeddings, lm_head, norms and routers stay 16-bit;
  one matrix is dequantized to the compute dtype while a layer runs;
- optimizers beyond torch.optim: bitsandbytes' block-wise 8-bit AdamW (paged or not) and 32-bit
  Lion, transformers' Adafactor; any of them stepped inside the backward (`optimizer.in_backward`);
- the loss: torchtune's chunked output + cross-entropy, Liger's fused linear cross-entropy;
- inference: the KV cache's dtype, and a prefill that keeps the whole prompt's logits;
- serving: a vLLM engine, whose paged KV cache takes what weights, the profiled activation peak and
  CUDA graphs leave of `gpu_util` x the GPU's memory.
"""

from __future__ import annotations

import numpy as np

from memsweep.columns import (
    Array, Columns, base_params, embedding_params, layer_params, lora_params, matrix_sides, q_width,
)

FP32 = 4.0

# --- quantized weights ------------------------------------------------------------------------

NF4_DOUBLE_QUANT_BLOCK = 256
"""Double quantization: the fp32 absmax of every 64-element block is itself quantized to 8 bits in
blocks of 256, each with one fp32 constant (Dettmers et al. 2023, "QLoRA", sec. 3: 32/64 = 0.5 bits
per parameter become 8/64 + 32/(64*256) = 0.127 bits)."""
GPTQ_SCALE_BYTES = 2.0
"""GPTQ / AWQ store one fp16 scale per group and output column (`scales`, (d_in/g, d_out))."""
GPTQ_ZERO_BYTES = 0.5
"""... and one 4-bit zero point per group and output column, packed eight to an int32 (`qzeros`,
(d_in/g, d_out/8) int32)."""
GPTQ_G_IDX_BYTES = 4.0
"""GPTQ only: `g_idx`, the group of every input row (int32, d_in per matrix); AWQ has none."""
INT8_ROW_SCALE_BYTES = 4.0
"""LLM.int8() (bitsandbytes `Int8Params`): an fp32 scale per output row (`SCB`, d_out)."""


def quant_layout(method: str, group: int, double_quant: bool) -> tuple[float, float, float, float, float]:
    """(bits per element, elements per group, bytes per group, bytes per input row, bytes per
    output row) of one quantized block matrix, as the library stores it."""
    if method in ("nf4", "fp4"):
        # packed two to a byte; one absmax per block of `group` (64): fp32, or 8-bit + an fp32
        # constant per 256 of them with double quantization
        per_block = 1.0 + FP32 / NF4_DOUBLE_QUANT_BLOCK if double_quant else FP32
        return 4.0, float(group), per_block, 0.0, 0.0
    if method == "int8":
        return 8.0, 0.0, 0.0, 0.0, INT8_ROW_SCALE_BYTES
    if method in ("gptq", "awq"):
        return 4.0, float(group), GPTQ_SCALE_BYTES + GPTQ_ZERO_BYTES, GPTQ_G_IDX_BYTES if method == "gptq" else 0.0, 0.0
    return 0.0, 0.0, 0.0, 0.0, 0.0


def quantized(c: Columns) -> Array:
    return c.q_bits > 0


def quantized_matrix_bytes(c: Columns) -> Array:
    """The block matrices in their stored format: packed values, group scales (and zero points),
    per-row metadata."""
    elements, rows_in, rows_out = matrix_sides(c)
    groups = np.where(c.q_group > 0, elements / np.maximum(c.q_group, 1.0), 0.0)
    return elements * c.q_bits / 8.0 + groups * c.q_group_bytes + rows_in * c.q_in_bytes + rows_out * c.q_out_bytes


def frozen_base_bytes(c: Columns, element_bytes: Array) -> Array:
    """A frozen base (inference, serving, a LoRA base): every parameter in `element_bytes`, or,
    quantized, the block matrices stored as their format stores them and the rest (embeddings,
    lm_head, norms, biases, routers) in `element_bytes` (16-bit)."""
    p = base_params(c)
    elements = matrix_sides(c)[0]
    return np.where(quantized(c), quantized_matrix_bytes(c) + (p - elements) * element_bytes, p * element_bytes)


def largest_matrix(c: Columns) -> Array:
    """Elements of a block's largest weight matrix (per tensor rank)."""
    h = c.hidden
    attn = np.maximum(h * q_width(c), c.heads * c.v_head_dim * h)
    mlp = np.where(c.layers > c.moe_layers, h * c.ffn, 0.0)
    moe = np.where(c.moe_layers > 0, h * np.maximum(c.expert_ffn, c.shared_ffn), 0.0)
    return np.maximum(attn, np.maximum(mlp, moe)) / c.tp


def dequant_bytes(c: Columns, compute_bytes: Array) -> Array:
    """A quantized layer dequantizes its weight to the compute dtype for the matmul (bitsandbytes'
    `dequantize_4bit` then `linear`; GPTQ / AWQ kernels without a fused path do the same), in the
    forward and again in the backward: one matrix alive while a layer runs."""
    return np.where(quantized(c), largest_matrix(c) * compute_bytes, 0.0)


def gathered_bytes(c: Columns, element_bytes: Array) -> Array:
    """Parameters whole on a GPU while ZeRO-3 / FSDP (or parameter offload) runs the forward and
    backward: the root module's (embeddings, final norm and an untied head: FSDP wraps them
    together and keeps them gathered through the step) and two blocks' (the one running, the one
    prefetched: FSDP's and DeepSpeed's prefetch of the next module)."""
    return (root_params(c) + 2.0 * layer_params(c)) * element_bytes / c.tp


def root_params(c: Columns) -> Array:
    """The root module's parameters, outside the blocks: the embeddings and an untied head (what
    FSDP / ZeRO-3 wrap together around the blocks)."""
    return embedding_params(c) + (1 - c.tied_embeddings) * c.vocab * c.hidden


# --- optimizers ---------------------------------------------------------------------------------

BNB_BLOCK = 256
"""bitsandbytes' block-wise 8-bit optimizer states: one fp32 absmax per 256 elements of each state
(bitsandbytes/optim/optimizer.py, `Optimizer2State.init_state`; Dettmers et al. 2022 used 2048)."""
BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes keeps 32-bit states for tensors of fewer than `min_8bit_size` = 4096 elements."""
BNB_8BIT_BYTES = 1.0 + FP32 / BNB_BLOCK
"""Bytes per element of one 8-bit state: the uint8 value and its share of the block's absmax."""


def vector_params(c: Columns, updated: Array) -> Array:
    """Trainable parameters in 1-D tensors (norms, biases): full training only; 0 with LoRA."""
    elements = matrix_sides(c)[0]
    embeddings = c.vocab * c.hidden + c.learned_positions * c.max_positions * c.hidden + c.type_vocab * c.hidden
    head = (1 - c.tied_embeddings) * c.vocab * c.hidden
    routers = c.moe_layers * c.experts * c.hidden
    pooler = c.pooler * c.hidden * c.hidden
    vectors = base_params(c) - elements - embeddings - head - routers - pooler
    return np.where(c.lora == 1, 0.0, np.clip(np.minimum(vectors, updated), 0.0, None))


def matrix_rows_and_columns(c: Columns) -> Array:
    """Adafactor's factored state: d_in + d_out of every trainable matrix (a row and a column
    vector each). Full training: the blocks' matrices, routers, embeddings and the head; LoRA:
    r x d_in and d_out x r per adapter (sum of d_in + d_out = adapter params / r, + 2r each)."""
    _, rows_in, rows_out = matrix_sides(c)
    embeddings = (c.vocab + c.hidden) + c.learned_positions * (c.max_positions + c.hidden)
    head = (1 - c.tied_embeddings) * (c.vocab + c.hidden)
    routers = c.moe_layers * (c.hidden + c.experts)
    full = rows_in + rows_out + embeddings + head + routers
    lora = lora_params(c) / np.maximum(c.lora_rank, 1.0)
    return np.where(c.lora == 1, lora, full)


def technique_state_bytes(c: Columns, updated: Array, trainable_bytes: Array) -> Array:
    """Optimizer state of the optimizers beyond torch.optim, before sharding (NaN-free 0 elsewhere):
    8-bit AdamW: two 8-bit states with block absmax (32-bit for 1-D tensors of a model under 4096
    wide); Lion: one fp32 momentum; Adafactor: fp32 row and column vectors per matrix, the full
    fp32 second moment of 1-D tensors, and an fp32 first moment with beta1."""
    small = np.where(c.hidden < BNB_MIN_8BIT_SIZE, vector_params(c, updated), 0.0)
    eight_bit = 2.0 * ((updated - small) * BNB_8BIT_BYTES + small * FP32)
    lion = updated * FP32
    vectors = vector_params(c, updated)
    adafactor = FP32 * (matrix_rows_and_columns(c) + vectors + c.opt_first_moment * updated)
    return np.where(c.opt_8bit == 1, eight_bit, np.where(c.opt_lion == 1, lion,
                                                         np.where(c.opt_adafactor == 1, adafactor, 0.0)))


def beyond_torch_optim(c: Columns) -> Array:
    return (c.opt_8bit + c.opt_lion + c.opt_adafactor) > 0


ADAFACTOR_STEP_TENSORS = {16: 4.0, 32: 2.0}
"""fp32 tensors of one parameter's size alive at the peak of transformers' Adafactor step (it steps
one parameter at a time): for a 16-bit parameter its fp32 gradient, the fp32 copy of the
parameter, the squared-gradient update and the factored estimate (4); for an fp32 parameter, whose
gradient and data it uses as they are, 2 (transformers 5.23 `Adafactor.step`, traced to the byte
on measure/optimizers.py's replica: tests/test_optimizers_impl.py). Its `update` of the previous
parameter is still alive then too; the largest parameter (embedding, head) follows a small one."""


def largest_trainable(c: Columns) -> Array:
    """Elements of the largest trainable tensor (per tensor rank): the embedding or head in full
    training; the largest adapter with LoRA."""
    full = np.maximum(c.vocab * c.hidden, largest_matrix(c) * c.tp) / c.tp
    widest = np.maximum(np.maximum(c.hidden, q_width(c)), np.maximum(c.ffn, c.expert_ffn))
    return np.where(c.lora == 1, c.lora_rank * widest, full)


def adafactor_step_bytes(c: Columns, trainable_bytes: Array) -> Array:
    """Adafactor's step temporaries: `ADAFACTOR_STEP_TENSORS` fp32 tensors of the largest trainable
    tensor's size."""
    n = np.where(trainable_bytes < FP32, ADAFACTOR_STEP_TENSORS[16], ADAFACTOR_STEP_TENSORS[32])
    return np.where(c.opt_adafactor == 1, n * largest_trainable(c) * FP32, 0.0)


# --- the loss -----------------------------------------------------------------------------------

def liger_chunk_tokens(c: Columns) -> Array:
    """Liger's fused linear cross-entropy splits the t tokens so that a chunk's logits are about the
    size of the input: inc = ceil(V / h), chunk = next_power_of_2(ceil(t / inc)) tokens
    (liger_kernel/ops/fused_linear_cross_entropy.py)."""
    t = c.batch * c.seq
    inc = np.ceil(c.vocab / c.hidden)
    chunk = np.ceil(t / np.maximum(inc, 1.0))
    return 2.0 ** np.ceil(np.log2(np.maximum(chunk, 1.0)))


# --- serving ------------------------------------------------------------------------------------

SAMPLER_FP32_TENSORS = 2.0
"""vLLM's profile run ends with a dummy sampler step over `max_num_seqs` rows: the fp32 logits and
the probabilities made from them ((max_seqs, V) fp32 each)."""

