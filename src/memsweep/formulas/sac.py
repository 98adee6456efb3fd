"""Per-op selective activation checkpointing (`recompute=op`), as torchtitan runs it.

torchtitan's `activation_checkpoint.mode=selective`, `selective_ac_option=op`
(torchtitan/parallelisms/parallelize_llama.py, 2024; the policy the reference runs is
`measure.models.per_op_sac_context`): every transformer block is checkpointed with a policy that
keeps the outputs of the ops in its `_save_list` and recomputes everything else in the backward.
The list holds `aten.mm` and the fused attention kernels (flash, memory-efficient; cuDNN in its
later versions); of the block's `aten.mm` calls, counted from 1 per block, the even-numbered ones
are recomputed ("saves output of all compute ops, except every second mm").

Which calls are `aten.mm` is the mechanism: a linear with a bias runs `aten.addmm` (not in the list),
a batched matmul `aten.bmm` (MoE experts, eager attention's scores), SDPA's math kernel its own
ops, none of them saved. A LoRA linear runs A, then B, then its base (`models.LoRALinear`); a
quantized base always runs `mm` (its bias is added after, `quantized.QuantizedMatmul`).

What a block keeps, beside its checkpointed input: the saved outputs (`sac_layer_bytes`). While a
block is re-run in the backward its own are consumed (each either saved again by the re-run or
freed), so at the re-run moment the other blocks' caches are kept (`sac_kept_bytes`).
"""

from __future__ import annotations

import numpy as np

from memsweep.columns import Columns
from memsweep.formulas.techniques import FP32
from memsweep.sdpa_rules import KERNELS

Array = np.ndarray

SAC_ATTENTION_KERNELS = ("cudnn", "flash", "efficient")
"""sdpa_rules.KERNELS whose outputs the policy keeps (output and log-sum-exp)."""


def _mm_outputs(c: Columns, moe: bool, compute: Array, adapter: Array) -> list[tuple[Array, Array]]:
    """One block's candidate matmul calls in execution order: (1 where the call is `aten.mm`,
    bytes of its output per token). Column-parallel outputs are per tensor-parallel rank."""
    tp = c.tp
    out: list[tuple[Array, Array]] = []

    quantized = c.q_bits > 0

    def linear(width: Array, bias: Array, lora: Array, column: bool = True, on: Array | float = 1.0) -> None:
        """A linear where `on`: its adapter's A and B (where `lora`), then its base."""
        share = width / tp if column else width
        adapted = on * (lora == 1)
        out.append((adapted, c.lora_rank * adapter))  # A (r per token)
        out.append((adapted, share * adapter))  # B
        out.append((on * ((bias == 0) | quantized), share * compute))

    mla = c.mla == 1
    q_width = c.heads * c.head_dim
    kv_width = c.kv_heads * c.head_dim
    nope = c.head_dim - c.rope_head_dim
    # attention: q, k, v (MLA: q_a, q_b or q; kv_a; kv_b), then o
    linear(c.q_lora_rank, 0.0, c.lora_q, column=False, on=mla & (c.q_lora_rank > 0))  # MLA's q_a (q's LoRA too)
    linear(q_width, np.where(mla, 0.0, c.qkv_bias), c.lora_q)
    linear(np.where(mla, c.kv_lora_rank + c.rope_head_dim, kv_width), np.where(mla, 0.0, c.qkv_bias), c.lora_k)
    linear(np.where(mla, c.heads * (nope + c.v_head_dim), kv_width), np.where(mla, 0.0, c.qkv_bias), c.lora_v)
    linear(c.hidden, c.out_bias, c.lora_o, column=False)
    gated = c.gated_mlp == 1

    def mlp(ffn: Array, on: Array) -> None:
        for name, width, column in (("gate", ffn, True), ("up", ffn, True), ("down", c.hidden, False)):
            linear(width, c.mlp_bias, getattr(c, f"lora_{name}"), column, on=on * (gated if name == "gate" else 1.0))

    if not moe:
        mlp(c.ffn, np.ones(len(c)))
        return out
    router_mm = (c.router_bias == 0).astype(float)
    out.append((router_mm, c.experts * np.where(c.router_fp32_logits == 1, FP32, compute)))
    # the experts run bmm (not saved); shared experts: an MLP, then their gate (h -> 1)
    shared = (c.shared_ffn > 0).astype(float)
    mlp(c.shared_ffn, shared)
    out.append((shared * c.shared_expert_gate, compute))
    return out


def _saved_per_token(c: Columns, moe: bool, compute: Array, adapter: Array) -> tuple[Array, Array]:
    """(bytes per token the policy keeps, of which the block's last matmul's output)."""
    count = np.zeros(len(c))
    saved = np.zeros(len(c))
    last = np.zeros(len(c))
    for is_mm, size in _mm_outputs(c, moe, compute, adapter):
        count = count + is_mm
        last = is_mm * (count % 2 == 1) * size
        saved = saved + last
    return saved, last


def sac_layer_bytes(c: Columns, kernel: Array, compute: Array, adapter: Array,
                    v_dim: Array) -> tuple[Array, Array, Array, Array]:
    """(a dense block's, an MoE block's) bytes the policy keeps: its odd-numbered `aten.mm`
    outputs and a fused attention call's output and log-sum-exp (fp32 per query and head; the
    memory-efficient kernel pads the queries to 32). 0 for rows without `recompute=op`."""
    on = (c.recompute_op == 1) & (c.training == 1)
    t = c.batch * c.seq
    fused = np.isin(kernel, [KERNELS.index(k) for k in SAC_ATTENTION_KERNELS]) & (c.eager_attention == 0)
    queries = np.where(kernel == KERNELS.index("efficient"), np.ceil(c.seq / 32.0) * 32.0, c.seq)
    attention = fused * (t * c.heads * v_dim * compute + c.batch * c.heads * queries * FP32) / c.tp
    dense, dense_last = _saved_per_token(c, False, compute, adapter)
    moe, moe_last = _saved_per_token(c, True, compute, adapter) if (c.moe_layers > 0).any() else (dense, dense_last)
    return (np.where(on, t * dense + attention, 0.0), np.where(on, t * moe + attention, 0.0),
            np.where(on, t * dense_last, 0.0), np.where(on, t * moe_last, 0.0))


def sac_total_bytes(c: Columns, kernel: Array, compute: Array, adapter: Array,
                    v_dim: Array) -> tuple[Array, Array, Array]:
    """(every block's saved outputs, the last block's, what of a block's stays through its own
    backward). The loss keeps all; the last block's re-run all the others' and what of its own
    the re-run does not consume: non-reentrant checkpointing stops recomputing at the last saved
    tensor, which a matmul saves (its input, its weight) before it runs, so the block's last
    matmul is not re-run and its cached output lives until the block's backward ends; unless an
    op after it saves something (a hidden dropout's mask, Gemma's post-MLP norm) or the block is
    one compiled Function (its tensors are saved when its whole forward has run)."""
    dense, moe, dense_last, moe_last = sac_layer_bytes(c, kernel, compute, adapter, v_dim)
    n_moe = np.where(c.experts > 0, c.moe_layers, 0.0)
    total = (c.layers - n_moe) * dense + n_moe * moe
    is_moe = n_moe > 0
    last = np.where(is_moe, moe, dense)
    # an MoE layer's last matmul is its shared experts' down projection (without their gate)
    tail = np.where(is_moe, moe_last * (c.shared_expert_gate == 0), dense_last)
    tail = tail * ((c.hidden_dropout == 0) & (c.block_norms != 4) & (c.compiled == 0))
    return total, last, tail
