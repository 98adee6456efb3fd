"""Work per step (issue 15 part 1): the FLOPs and HBM bytes of the reference step, vectorized over
`Columns` like the memory formulas (numpy only, no torch).

Matmul FLOPs are exact: the step is written down as the reference model runs it
(measure/models.py, measure/workloads.py), one `Op` per matmul in execution order, each counted as
`torch.utils.flop_counter.FlopCounterMode` counts it (tests/test_work.py traces the reference step
under fake tensors and compares integers):

- a linear over n rows, d_in -> d_out: mm / addmm, 2·n·d_in·d_out (`mm_flop`); its backward one
  such mm for the input's gradient when the input requires grad, one for the weight's when the
  weight trains (a frozen base: no weight gradient; LoRA: the adapters' A and B and their inputs);
- MoE experts: bmm / baddbmm over E x C rows, C = ceil(t·k / E), the reference's balanced, padded
  grouping (`MoE.forward`: static shapes, so routing does not change the count);
- attention's s x s part: eager, two bmm (QK^T and PV, `bmm_flop`); sdpa, FlopCounterMode's
  `sdpa_flop_count`, 2·b·h·s_q·s_k·(d_q + d_v), and backward `sdpa_backward_flop_count`,
  2·b·h·s_q·s_k·(3·d_q + 2·d_v) (it re-counts the scores); both full s x s, not causal-halved;
- recomputation as non-reentrant `torch.utils.checkpoint` runs it: the recompute stops once the
  last tensor the forward saved is saved again (early stop, the default), so ops that run after
  the last save are not re-run. A pre-norm block's last matmul is the MLP's down projection, whose
  inputs are saved before it runs: full recompute re-runs the block less its down projection
  (with it when hidden dropout saves a mask after it);
  eager selective recompute re-runs QK^T but not PV (whose inputs are saved before it runs).
  `Op.saves_before` / `saves_after` carry what decides this.

Optimizer FLOPs (elementwise, per trainable parameter) and every byte count are approximate; each
constant below says what it counts. Bytes are the HBM traffic a step needs at least, as the
reference runs it: every weight read once per pass in its stored format (plus autocast's 16-bit
copy written and read, and QLoRA's dequantized copy), each matmul's activation input read and
output written once, flash attention's q, k, v read and output written (eager: the s x s scores
`EAGER_SCORE_PASSES` times), norms / residuals / activations as `ELEMENTWISE_*` passes, the KV
cache read once per decode step (not transformers' DynamicCache re-copies).

Everything is per GPU unsharded (tp = pp = 1, the whole optimizer step: a time model divides by the
model and ZeRO shards), per optimizer step for training (grad_accum micro-batches), per request
for inference (a prefill of `seq` tokens, then `gen_tokens` decode steps of one token per
sequence; a `serve` row is counted the same way). docs/formulas.md ("Work per step") has the
terms and the fake-tensor check.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from memsweep.columns import Array, Columns
from memsweep.formulas import techniques as tq
from memsweep.formulas.detailed import (
    MATH_KERNEL,
    autocast,
    compute_bytes,
    kv_element_bytes,
    sdpa_kernel,
    trainable_bytes,
    updated_params,
)

FP32 = 4.0

# --- optimizer: elementwise FLOPs per trainable parameter (approximate) --------------------------

ADAM_FLOPS_PER_PARAM = 14.0
"""torch's AdamW step per element: decoupled decay p·(1 - lr·wd) 1, m.lerp_(g) 3,
v.mul_(b2).addcmul_(g, g) 4, sqrt(v) / bc2 + eps 3, p.addcdiv_(m, denom) 3 (Adam: the same
within one; counted for both)."""
SGD_FLOPS_PER_PARAM = 2.0
"""p.add_(g, alpha=-lr)."""
MOMENTUM_FLOPS_PER_PARAM = 2.0
"""SGD with momentum adds buf.mul_(m).add_(g)."""
ADAM_8BIT_EXTRA_FLOPS_PER_PARAM = 4.0
"""bitsandbytes' 8-bit AdamW: Adam's arithmetic plus a dequantize (code x absmax) and a
re-quantize (/ absmax) of each of its two states (the code search is comparisons, not counted)."""
LION_FLOPS_PER_PARAM = 10.0
"""Lion: sign(m.lerp(g, 1 - b1)) 4, p·(1 - lr·wd) 1, p - lr·update 2, m.lerp_(g, 1 - b2) 3."""
ADAFACTOR_FLOPS_PER_PARAM = 13.0
"""transformers' Adafactor per element: g² + eps 2, row and column means 2, the factored estimate
r_i·c_j / mean 2, rsqrt 1, g·rsqrt 1, the update's RMS and clip 3, lr scale 1, p - update 1."""
ADAFACTOR_FIRST_MOMENT_FLOPS_PER_PARAM = 3.0
"""... with beta1, its exp_avg lerp."""

# --- bytes: what the approximate byte counts assume ------------------------------------------------

EAGER_SCORE_PASSES = 8.0
"""Eager attention's s x s traffic per forward, in passes over b·h·s_q·s_k compute-dtype elements:
QK^T writes the scores, the scale and the mask read and write them (4), the softmax reads them and
writes the probabilities, which PV reads (fp32 softmax and its cast: about the same again)."""
EAGER_SCORE_BACKWARD_PASSES = 8.0
"""... and per backward: the probabilities' and the scores' gradients written and read, the saved
probabilities read."""
ELEMENTWISE_HIDDEN_PASSES = 10.0
"""Per block, passes over t·h compute-dtype elements outside the matmuls: two norms read and write
(4), two residual adds read two and write one (6)."""
ELEMENTWISE_FFN_PASSES = 3.0
"""Per MLP, passes over t·ffn: the activation reads its input and writes it (2); a gated MLP's
product reads two and writes one (3 in all for it, the activation fused: SwiGLU / GeGLU kernels)."""
ELEMENTWISE_BACKWARD_FACTOR = 2.0
"""The backward of the elementwise ops moves about twice their forward's bytes (the gradient in,
the saved input, the gradient out)."""
LOSS_BYTES_PER_LOGIT = 24.0
"""Training: the logits upcast to fp32 (read 2, write 4), log-softmax (read 4, write 4), the loss's
gather and its backward (the fp32 gradient written and read, cast to 16 bits: about 10)."""
FUSED_LOSS_BYTES_PER_LOGIT = 6.0
"""A cross-entropy kernel on the 16-bit logits (`kernels.loss=fused`, flash-attn's / Liger's, and a
compiled loss, which Inductor fuses the same way): the forward reads the logits once (2), the
backward reads them and writes the gradient over them (2 + 2): no fp32 copy, no log-softmax."""
FUSED_LINEAR_LOSS_BYTES_PER_LOGIT = 8.0
"""Liger's fused linear cross-entropy, per logit of each chunk (the head's matmul writing it is the
matmul's own traffic): the cross-entropy kernel reads it and writes its gradient in place (2 + 2),
the two gradient matmuls read it (2 + 2), all inside the forward."""

ADAM_STEP_TENSOR_PASSES = 7.0
"""torch Adam(W) per element: reads parameter, gradient, m and v, writes parameter, m and v
(foreach and fused move the same; for-loop's temporaries are not counted)."""
ADAFACTOR_TEMPORARY_PASSES = 4.0
"""Adafactor's fp32 update tensor (per element): written, read for its RMS, scaled in place, read
by the parameter update."""


@dataclass(frozen=True)
class Work:
    """One GPU's work for one job as the reference step runs it, unsharded (tp = pp = 1; the time
    model divides by tp x pp), per optimizer step for training (x grad_accum micro-batches), per
    request for inference (the prefill of `seq` tokens + `gen_tokens` decode steps). Arrays, one
    per row. MoE experts run the reference's padded E x ceil(t·k / E) rows (`step_work(dropless=True)`:
    t·k); MLA's latent-cache decode re-expands the cache every step (`mla_cache_expansion_flops`)."""

    forward_flops: Array
    """Matmul FLOPs of the forward pass(es) (training), as FlopCounterMode counts them."""
    backward_flops: Array
    """Matmul FLOPs of the backward: input gradients where the input requires grad, weight
    gradients of the trained weights (frozen base: none; LoRA: the adapters'); without
    `recompute_flops`."""
    recompute_flops: Array
    """Forward matmul FLOPs re-run inside the backward: full, every block less what follows its
    last saved tensor (the down projection); selective, the attention core (eager: QK^T only)."""
    optimizer_flops: Array
    """Elementwise FLOPs of the optimizer step: `*_FLOPS_PER_PARAM` x updated parameters (approx)."""
    prefill_flops: Array
    """Inference: matmul FLOPs of the prompt's forward (its LM head: the last position, or all)."""
    decode_flops: Array
    """Inference: matmul FLOPs of all `gen_tokens` decode steps."""
    attention_flops: Array
    """The s x s part included above (QK^T and PV: forward, backward and recompute, or prefill and
    decode), as FlopCounterMode counts it (full s_q x s_k)."""
    causal_attention_flops: Array
    """The same work as a causal flash kernel does it: only the (query, key) pairs the mask allows,
    s(s+1)/2 per head and sequence for a causal prompt, the window for sliding-window layers
    (decode steps already compute only what they attend to; an encoder attends to all)."""
    forward_bytes: Array
    """HBM bytes the training forward(s) read and write at least (approximate, module docstring)."""
    backward_bytes: Array
    """... the backward(s), with the recomputation's forward bytes."""
    optimizer_bytes: Array
    """States, master weights, gradients and parameters read and written by the step."""
    prefill_bytes: Array
    """Inference: the prompt's forward, + its KV cache written (and an all-logits prefill's upcast)."""
    decode_bytes: Array
    """Per request: the sum over the decode steps of the weights read and the growing KV cache
    read (each step reads every cached token of every layer, a local layer its window)."""

    @property
    def matmul_flops(self) -> Array:
        """Every matmul FLOP of the step: what FlopCounterMode counts in total."""
        return self.forward_flops + self.backward_flops + self.recompute_flops + self.prefill_flops + self.decode_flops


# --- the op model ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    """One op of a block's forward, in execution order, over all the layers and calls it stands for."""

    forward: Array
    """Its matmul FLOPs."""
    backward: Array
    """Its backward's matmul FLOPs (0 where nothing it reads requires grad)."""
    saves_before: Array | float = 0.0
    """1 where autograd saves a tensor for the backward before the op runs (its inputs: mm, bmm)."""
    saves_after: Array | float = 0.0
    """1 where it saves one after it runs (its output: softmax, sdpa; a norm, an activation)."""
    forward_bytes: Array | float = 0.0
    backward_bytes: Array | float = 0.0
    attention: bool = False
    """The s x s part of attention (QK^T, PV)."""
    causal: Array | float = 1.0
    """Attention: the share of its (query, key) pairs a causal / sliding-window mask allows."""
    mm: Array | float = 0.0
    """1 where it runs as `aten.mm` (a linear without a bias, an adapter, a quantized base; not
    addmm, not the experts' bmm): per-op selective checkpointing keeps every other one."""
    fused_attention: Array | float = 0.0
    """1 for an SDPA call (its output kept by per-op selective checkpointing on a fused kernel)."""


ZERO = Op(forward=0.0, backward=0.0)


def save(flag: Array | float) -> Op:
    """A non-matmul op that saves a tensor for the backward where `flag` (a norm, an activation, a
    softmax, an index)."""
    return Op(forward=0.0, backward=0.0, saves_after=flag)


def either(*flags: Array | float) -> Array:
    """Logical or of 0/1 flags."""
    out = np.asarray(flags[0], dtype=np.float64)
    for f in flags[1:]:
        out = np.maximum(out, f)
    return out


def pick(cond: Array, a: Op, b: Op) -> Op:
    """Row by row, op `a` where `cond`, else `b` (one program serves every row)."""
    def w(x, y):
        return np.where(cond, x, y)
    return Op(forward=w(a.forward, b.forward), backward=w(a.backward, b.backward),
              saves_before=w(a.saves_before, b.saves_before), saves_after=w(a.saves_after, b.saves_after),
              forward_bytes=w(a.forward_bytes, b.forward_bytes), backward_bytes=w(a.backward_bytes, b.backward_bytes),
              attention=a.attention or b.attention, causal=w(a.causal, b.causal), mm=w(a.mm, b.mm),
              fused_attention=w(a.fused_attention, b.fused_attention))


def pick_all(cond: Array, a: list[Op], b: list[Op]) -> list[Op]:
    """Two programs as one, position by position (the shorter padded with no-ops)."""
    n = max(len(a), len(b))
    return [pick(cond, x, y) for x, y in zip(a + [ZERO] * (n - len(a)), b + [ZERO] * (n - len(b)))]


@dataclass(frozen=True)
class Pass:
    """The forwards of one phase as one group of layers sees them: counts are summed over the
    phase's forward calls; every op is multiplied by `layers`, the layers the group holds."""

    layers: Array
    calls: Array
    """Forward calls: 1 for a training micro-batch or a prefill, gen_tokens for decode."""
    tokens: Array
    """Tokens per call (batch x new positions)."""
    qk: Array
    """Per layer and head: the sum over calls and sequences of s_q x s_k (what attention computes)."""
    pairs: Array
    """... of the (query, key) pairs a causal / window mask allows."""
    keys: Array
    """Per layer: the sum over calls and sequences of s_k (the keys attention reads)."""
    kv_rows: Array
    """Rows MLA's kv_b expansion runs on, summed over calls (with a latent cache: every key read)."""
    x_grad: Array
    """1 where the block's input requires grad (0: a LoRA model's first block, below every adapter)."""
    training: Array
    cache: Array
    """1 for a forward with a KV cache (inference): attention reads K and V in the cache's dtype."""
    dropless: bool = False
    """Experts run exactly t·k token copies (a dropless grouped GEMM), not the reference's E x C."""

    @property
    def rows(self) -> Array:
        return self.calls * self.tokens


@dataclass(frozen=True)
class Sizes:
    """Bytes per element of what the ops move."""

    act: Array
    """Activations: the compute dtype."""
    block_weight: Array
    """A block matrix read by the forward: its stored format, + autocast's 16-bit copy written and
    read (mixed training), + the dequantized 16-bit copy (a quantized LoRA base)."""
    block_weight_backward: Array
    """... read again for the input's gradient (the saved 16-bit cast; dequantized again)."""
    other_weight: Array
    """Embeddings, LM head, routers: never quantized."""
    other_weight_backward: Array
    adapter_weight: Array
    adapter_weight_backward: Array
    grad: Array
    """A trained weight's gradient: written (autocast: 16-bit, read, converted to fp32) and, after
    the first micro-batch, read and written again to accumulate."""
    kv: Array
    """K and V read by attention in a cached forward (kv_dtype)."""


def sizes(c: Columns) -> Sizes:
    cb, tb, cast = compute_bytes(c), trainable_bytes(c), autocast(c)
    full = (c.training == 1) & (c.lora == 0)
    packed = tq.quantized_matrix_bytes(c) / np.maximum(tq.matrix_sides(c)[0], 1.0)
    quant = tq.quantized(c)
    trained = np.where(cast, FP32 + 2.0 + 2.0, np.where(c.param_policy == 1, cb, c.dtype_bytes))
    trained_backward = np.where(cast, 2.0, np.where(c.param_policy == 1, cb, c.dtype_bytes))
    # inference reads the packed weights (fused int4 / int8 kernels); QLoRA dequantizes a 16-bit copy
    frozen = np.where(quant, packed + c.training * 2.0 * cb, c.dtype_bytes)
    frozen_other = np.where(quant, cb, c.dtype_bytes)
    grad = np.where(cast, 2.0 + 2.0 + FP32, tb) + 2.0 * tb * (c.grad_accum - 1) / c.grad_accum
    return Sizes(act=cb, block_weight=np.where(full, trained, frozen),
                 block_weight_backward=np.where(full, trained_backward, frozen),
                 other_weight=np.where(full, trained, frozen_other),
                 other_weight_backward=np.where(full, trained_backward, frozen_other),
                 adapter_weight=np.where(cast, FP32 + 2.0 + 2.0, tb), adapter_weight_backward=np.where(cast, 2.0, tb),
                 grad=grad, kv=kv_element_bytes(c))


def mm_flops(rows: Array, d_in: Array, d_out: Array) -> Array:
    """2·m·k·n, FlopCounterMode's `mm_flop` (addmm: the same; bmm / baddbmm: the batch folded into m)."""
    return 2.0 * rows * d_in * d_out


def matmul_op(n: Array, d_in: Array, d_out: Array, weights: Array, x_grad: Array, w_grad: Array,
              saves: Array, w_read: Array, w_read_backward: Array, act: Array, grad: Array) -> Op:
    """x (n x d_in) @ W (d_in x d_out), `weights` weight elements read: its forward, and its
    backward's input gradient (if `x_grad`) and weight gradient (if `w_grad`), one mm each."""
    fwd = mm_flops(n, d_in, d_out)
    io = n * (d_in + d_out) * act
    return Op(forward=fwd, backward=fwd * (x_grad + w_grad), saves_before=saves,
              forward_bytes=io + weights * w_read,
              backward_bytes=x_grad * (io + weights * w_read_backward) + w_grad * (io + weights * grad))


def linear(c: Columns, p: Pass, z: Sizes, d_in: Array, d_out: Array, x_grad: Array,
           adapted: Array | float = 0.0, on: Array | float = 1.0, rows: Array | None = None,
           frozen_kind: str = "block", expert: bool = False, bias: Array | float = 0.0) -> tuple[list[Op], Array]:
    """A linear layer where `on`, over `rows` rows (default: the pass's tokens), as the reference
    runs it: `LoRALinear` the adapter's x·A^T then (xA)·B^T, then the base mm; `Experts._linear`
    the base bmm first. Returns its ops and whether its output requires grad.

    Backward: the base, an input gradient where the input requires grad and a weight gradient
    where it trains (full training); the adapter, A's gradient (+ x's), and B's and (xA)'s. A
    quantized base (`QuantizedMatmul`, an autograd.Function) saves no tensor. `frozen_kind`:
    "block" (a block matrix: quantized with the base), "other" (routers, shared gates: never)."""
    n = on * p.layers * (p.rows if rows is None else rows)
    # a weight is read once per forward call; experts are E stacked matrices
    calls = on * p.layers * p.calls * (c.experts if expert else 1.0)
    r = c.lora_rank
    tr = p.training
    full = tr * (1 - c.lora)
    quant = tq.quantized(c) * (frozen_kind == "block")
    wb, wbb = (z.block_weight, z.block_weight_backward) if frozen_kind == "block" else (z.other_weight, z.other_weight_backward)
    x_grad = x_grad * tr
    base = matmul_op(n, d_in, d_out, calls * d_in * d_out, x_grad, full,
                     saves=on * (1 - quant) * either(x_grad, full), w_read=wb, w_read_backward=wbb, act=z.act, grad=z.grad)
    a = adapted * on
    lora_a = matmul_op(a * n, d_in, r, a * calls * d_in * r, x_grad, tr, saves=a * tr, w_read=z.adapter_weight,
                       w_read_backward=z.adapter_weight_backward, act=z.act, grad=z.grad)
    lora_b = matmul_op(a * n, r, d_out, a * calls * r * d_out, tr, tr, saves=a * tr, w_read=z.adapter_weight,
                       w_read_backward=z.adapter_weight_backward, act=z.act, grad=z.grad)
    if not expert:  # `aten.mm` (a bias makes the base an addmm, but for a quantized base's)
        base = replace(base, mm=on * (1.0 - bias * (1.0 - quant)))
        lora_a, lora_b = replace(lora_a, mm=a), replace(lora_b, mm=a)
    ops = [base, lora_a, lora_b] if expert else [lora_a, lora_b, base]
    return ops, on * either(x_grad, full, a * tr)


def attention_core(c: Columns, p: Pass, z: Sizes, q_grad: Array, k_grad: Array, v_grad: Array) -> list[Op]:
    """softmax(q k^T) v over `p.qk` (query, key) pairs per head (`Attention._attend`): sdpa, one op
    (FlopCounterMode's `sdpa_flop_count` and `sdpa_backward_flop_count`; MLA's narrower head padded
    to the wider, as the reference pads it for a fused kernel); eager, QK^T, the softmax, PV (GQA:
    K and V repeated to every query head, so h_q heads either way). The three ops are returned as
    one program for both (sdpa's last two are no-ops)."""
    h, dq, dv = c.heads, c.head_dim, c.v_head_dim
    d = np.maximum(dq, dv)
    prod = p.layers * h * p.qk  # b·h·s_q·s_k over calls and layers
    causal = np.where(p.qk > 0, p.pairs / np.maximum(p.qk, 1.0), 1.0)
    any_grad = either(q_grad, k_grad, v_grad) * p.training
    qk_grad = either(q_grad, k_grad) * p.training
    # flash: q, k, v read and the output (and its fp32 log-sum-exp) written; cached K and V in the
    # cache's dtype; MLA's expanded K and V have every head
    kv_elem = np.where(p.cache == 1, z.kv, z.act)
    kv_heads = np.where(c.mla == 1, c.heads, c.kv_heads)
    io = p.layers * (p.rows * h * ((dq + dv) * z.act + FP32) + p.keys * kv_heads * (dq + dv) * kv_elem)
    sdpa = Op(forward=2.0 * prod * (d + d), backward=any_grad * 2.0 * prod * (3.0 * d + 2.0 * d),
              saves_before=any_grad, saves_after=any_grad, attention=True, causal=causal,
              forward_bytes=io, backward_bytes=any_grad * 2.0 * io, fused_attention=1.0)
    scores = prod * z.act
    qk = Op(forward=2.0 * prod * dq, backward=p.training * 2.0 * prod * dq * (q_grad + k_grad),
            saves_before=qk_grad, attention=True, causal=causal,
            forward_bytes=io / 2.0 + (EAGER_SCORE_PASSES - 1.0) * scores,
            backward_bytes=qk_grad * (io + EAGER_SCORE_BACKWARD_PASSES * scores))
    pv = Op(forward=2.0 * prod * dv, backward=p.training * 2.0 * prod * dv * (qk_grad + v_grad),
            saves_before=any_grad, attention=True, causal=causal,
            forward_bytes=io / 2.0 + scores, backward_bytes=any_grad * io)
    eager = c.eager_attention == 1
    return [pick(eager, qk, sdpa), pick(eager, save(qk_grad), ZERO), pick(eager, pv, ZERO)]


def attention(c: Columns, p: Pass, z: Sizes, x_grad: Array) -> tuple[list[Op], list[Op], Array]:
    """`Attention.forward`: q, k, v (then q/k norms and RoPE), or MLA's path; the core; o. Returns
    the ops, the core's alone (what selective recompute re-runs) and whether the output requires grad."""
    h, tr = c.hidden, p.training
    q_w, kv_w = c.heads * c.head_dim, c.kv_heads * c.head_dim
    lq, lk, lv, lo = (c.lora * f for f in (c.lora_q, c.lora_k, c.lora_v, c.lora_o))
    q_ops, gq = linear(c, p, z, h, q_w, x_grad, lq, bias=c.qkv_bias)
    k_ops, gk = linear(c, p, z, h, kv_w, x_grad, lk, bias=c.qkv_bias)
    v_ops, gv = linear(c, p, z, h, kv_w, x_grad, lv, bias=c.qkv_bias)
    mha = q_ops + k_ops + v_ops + [save(tr * (c.qk_norm > 0) * either(gq, gk)), save(tr * (c.rope_dim > 0) * either(gq, gk))]
    # MLA (`Attention._mla_qkv`): q_a, its norm, q_b (or one q); kv_a, its norm and RoPE; kv_b over
    # the latent of every token attention reads (with a latent cache, the whole cache every step)
    qlr, klr, nope = c.q_lora_rank, c.kv_lora_rank, c.head_dim - c.rope_head_dim
    has_qa = (qlr > 0).astype(float)
    qa_ops, gqa = linear(c, p, z, h, np.where(has_qa == 1, qlr, q_w), x_grad, lq)
    qb_ops, gqb = linear(c, p, z, qlr, q_w, gqa, lq, on=has_qa)
    mla_q = np.where(has_qa == 1, gqb, gqa)
    kva_ops, gkva = linear(c, p, z, h, klr + c.rope_head_dim, x_grad, lk)
    kvb_ops, gkvb = linear(c, p, z, klr, c.heads * (nope + c.v_head_dim), gkva, lv, rows=p.kv_rows)
    mla = (qa_ops + [save(tr * has_qa * gqa)] + qb_ops + kva_ops
           + [save(tr * gkva), save(tr * either(gkva, mla_q))] + kvb_ops)
    is_mla = c.mla == 1
    qkv = pick_all(is_mla, mla, mha)
    q_grad = np.where(is_mla, mla_q, gq)
    k_grad = np.where(is_mla, either(gkvb, gkva), gk)
    v_grad = np.where(is_mla, gkvb, gv)
    core = attention_core(c, p, z, q_grad, k_grad, v_grad)
    o_ops, go = linear(c, p, z, c.heads * c.v_head_dim, h, either(q_grad, k_grad, v_grad), lo, bias=c.out_bias)
    return qkv + core + o_ops, core, go


def mlp(c: Columns, p: Pass, z: Sizes, x_grad: Array, ffn: Array, on: Array | float = 1.0,
        rows: Array | None = None, expert: bool = False) -> tuple[list[Op], Array]:
    """`MLP.forward` (and `Experts.forward` with `expert`): gated, gate, its activation, up, the
    product, down; GELU, up, its activation, down."""
    h, tr = c.hidden, p.training
    lg, lu, ld = (c.lora * f for f in (c.lora_gate, c.lora_up, c.lora_down))
    gated = (c.gated_mlp == 1) * on
    kw = dict(rows=rows, expert=expert, bias=c.mlp_bias)
    gate_ops, gg = linear(c, p, z, h, ffn, x_grad, lg, on=gated, **kw)
    up_ops, gu = linear(c, p, z, h, ffn, x_grad, lu, on=on, **kw)
    inner = either(gg, gu)
    down_ops, gd = linear(c, p, z, ffn, h, inner, ld, on=on, **kw)
    return gate_ops + [save(tr * gg)] + up_ops + [save(tr * inner)] + down_ops, gd


def moe(c: Columns, p: Pass, z: Sizes, x_grad: Array) -> tuple[list[Op], Array]:
    """`MoE.forward`: the router (h -> E), its softmax and top-k; the token copies grouped E x C,
    C = ceil(t·k / E) per call (balanced and padded: the reference's static shapes, whatever the
    routing), through the experts' bmm; weighted and summed back (index_add); the shared experts (one
    MLP of their joint size) and Qwen2-MoE's sigmoid gate."""
    h, E, k, tr = c.hidden, c.experts, c.experts_per_token, p.training
    router_ops, gr = linear(c, p, z, h, E, x_grad, frozen_kind="other", bias=c.router_bias)
    rows = p.calls * (p.tokens * k if p.dropless else E * np.ceil(p.tokens * k / np.maximum(E, 1.0)))
    expert_ops, ge = mlp(c, p, z, x_grad, c.expert_ffn, rows=rows, expert=True)
    combined = either(ge, gr) * tr
    has_shared = (c.shared_ffn > 0).astype(float)
    shared_ops, gs = mlp(c, p, z, x_grad, c.shared_ffn, on=has_shared)
    has_gate = (c.shared_expert_gate == 1).astype(float)
    gate_ops, gsg = linear(c, p, z, h, 1.0, x_grad, on=has_gate, frozen_kind="other")
    ops = (router_ops + [save(tr * gr), save(tr * x_grad)] + expert_ops + [save(combined)]
           + shared_ops + gate_ops + [save(tr * has_gate * either(gsg, gs))])
    return ops, either(combined, gs, gsg)


def block(c: Columns, p: Pass, z: Sizes, moe_layer: bool) -> tuple[list[Op], list[Op]]:
    """`Block.forward` of `p.layers` layers: pre-norm, sequential or parallel (one shared norm or
    two), Gemma's post-norms, or BERT's post-norm; a dense or an MoE MLP. Returns its ops and the
    attention core's."""
    tr = p.training
    full = tr * (1 - c.lora)
    x_grad = p.x_grad * tr
    norm_in = either(x_grad, full)  # a norm's output requires grad (and it saves) if its input or weight does
    post = c.family == 2
    parallel = c.parallel_block == 1
    attn_ops, core, ga = attention(c, p, z, np.where(post, x_grad, norm_in))
    residual = either(x_grad, ga)
    mlp_in = np.where(parallel, norm_in, either(residual, full) * tr)
    mlp_ops, gm = moe(c, p, z, mlp_in) if moe_layer else mlp(c, p, z, mlp_in, c.ffn)
    sandwich = (c.block_norms == 4).astype(float)
    second_norm = np.where(parallel, (c.block_norms >= 2) * norm_in, mlp_in)
    # hidden dropout keeps a mask after the attention's and the MLP's output (memsweep's and
    # transformers' blocks): a save after the down projection, so a recomputation runs it too
    drop = (c.hidden_dropout > 0) * tr
    ops = ([save(np.where(post, 0.0, norm_in))] + attn_ops
           + [save(either(sandwich * either(ga, full), drop * ga) * tr), save(second_norm)]
           + mlp_ops + [save(either(either(sandwich, post) * either(gm, full, residual), drop * gm) * tr)])
    return ops, core


def executed(ops: list[Op]) -> list[Array]:
    """Which ops a non-reentrant checkpoint's recomputation runs: those a save follows (its early
    stop raises once the last tensor the forward saved is saved again)."""
    later: Array | float = 0.0
    out = []
    for op in reversed(ops):
        out.append(either(op.saves_after, later))
        later = either(later, op.saves_before, op.saves_after)
    return out[::-1]


@dataclass(frozen=True)
class PhaseWork:
    """Blocks' work in one phase."""

    forward: Array
    backward: Array
    recompute: Array
    attention: Array
    causal: Array
    forward_bytes: Array
    backward_bytes: Array

    def __add__(self, other: PhaseWork) -> PhaseWork:
        return PhaseWork(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))


def sac_kept(c: Columns, ops: list[Op], training: Array) -> list[Array]:
    """Per op, 1 where per-op selective checkpointing (recompute=op, formulas/sac.py) keeps its
    output, so its recomputation runs nothing: the odd-numbered `aten.mm` calls of the block and
    SDPA on a fused kernel (not its math kernel, not eager attention)."""
    on = training * c.recompute_op
    if not np.any(on):
        return [0.0] * len(ops)
    fused = (sdpa_kernel(c) != MATH_KERNEL) & (c.eager_attention == 0)
    count = np.zeros(len(c))
    kept = []
    for op in ops:
        count = count + op.mm
        kept.append(on * np.maximum(op.mm * (count % 2 == 1), op.fused_attention * fused))
    return kept


def run(c: Columns, p: Pass, z: Sizes, moe_layer: bool) -> PhaseWork:
    """The FLOPs and bytes of `p.layers` blocks in one phase; recomputation: full re-runs the
    block's executed ops, selective the core's (where the core has something to save)."""
    ops, core = block(c, p, z, moe_layer)
    full, selective = p.training * c.recompute_full, p.training * c.recompute_selective
    kept = sac_kept(c, ops, p.training)
    rerun = ([(e * full * (1.0 - k), op) for e, op, k in zip(executed(ops), ops, kept)]
             + [(e * selective, op) for e, op in zip(executed(core), core)])
    att = [op for op in ops if op.attention]
    return PhaseWork(
        forward=sum(op.forward for op in ops),
        backward=p.training * sum(op.backward for op in ops),
        recompute=sum(e * op.forward for e, op in rerun),
        attention=sum(op.forward + p.training * op.backward for op in att) + sum(e * op.forward for e, op in rerun if op.attention),
        causal=(sum((op.forward + p.training * op.backward) * op.causal for op in att)
                + sum(e * op.forward * op.causal for e, op in rerun if op.attention)),
        forward_bytes=sum(op.forward_bytes for op in ops),
        backward_bytes=p.training * sum(op.backward_bytes for op in ops) + sum(e * op.forward_bytes for e, op in rerun))


# --- the phases -------------------------------------------------------------------------------------

def sum_min(a: Array, b: Array, w: Array) -> Array:
    """The sum of min(x, w) over the integers x = a..b (0 where b < a)."""
    u = np.minimum(b, w)
    below = np.where(u >= a, (a + u) * (u - a + 1) / 2.0, 0.0)
    above = w * np.maximum(b - np.maximum(a - 1, w), 0.0)
    return np.where(b >= a, below + above, 0.0)


def layer_groups(c: Columns) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """(dense, MoE, local, global) layer counts of the first layer and of the rest. The first layer
    is an MoE layer when every layer is (dense layers come first); it is local when the model has
    local layers (every shipped pattern starts with one: Gemma-2/3, gpt-oss, Mistral; only the
    causal count of a LoRA model's first layer depends on it)."""
    moe0 = ((c.moe_layers >= c.layers) & (c.experts > 0)).astype(float)
    local0 = (c.local_layers > 0).astype(float)
    first = (1 - moe0, moe0, local0, 1 - local0)
    rest = (c.layers - c.moe_layers - (1 - moe0), c.moe_layers - moe0, c.local_layers - local0,
            c.layers - c.local_layers - (1 - local0))
    return first, rest


def blocks(c: Columns, p: Pass, local: Pass, first_x_grad: Array) -> PhaseWork:
    """Every block of one phase: the first layer (whose input may not require grad) and the rest,
    each split into its dense and MoE layers. Local layers differ from global ones only in what
    attention sees (`local`'s qk, pairs, keys, kv_rows), so each group carries their average."""
    z = sizes(c)
    first, rest = layer_groups(c)
    total = None
    for (dense, moe_n, n_local, n_global), x_grad in ((first, first_x_grad), (rest, np.ones(len(c)))):
        n = np.maximum(n_local + n_global, 1.0)
        mix = {f: (n_local * getattr(local, f) + n_global * getattr(p, f)) / n for f in ("qk", "pairs", "keys", "kv_rows")}
        for count, is_moe in ((dense, False), (moe_n, True)):
            w = run(c, replace(p, layers=count, x_grad=x_grad, **mix), z, is_moe)
            total = w if total is None else total + w
    return total


def prompt_passes(c: Columns, training: bool, dropless: bool = False) -> tuple[Pass, Pass]:
    """(global, local) layers' view of one forward over `seq` tokens per sequence from position 0 (a
    training micro-batch, a prefill): s² (query, key) pairs computed per head, of which a causal
    mask allows s(s+1)/2, a window sum(min(i, w)), an encoder all."""
    s, b, n = c.seq, c.batch, len(c)
    one = np.ones(n)
    encoder = c.family == 2
    glob = Pass(layers=one, calls=one, tokens=b * s, qk=b * s * s, pairs=b * np.where(encoder, s * s, s * (s + 1) / 2.0),
                keys=b * s, kv_rows=b * s, x_grad=one, training=np.full(n, float(training)),
                cache=np.full(n, 0.0 if training else 1.0), dropless=dropless)
    return glob, replace(glob, pairs=b * np.where(encoder, s * s, sum_min(one, s, c.window)))


def decode_passes(c: Columns, dropless: bool = False) -> tuple[Pass, Pass]:
    """(global, local) layers' view of the `gen_tokens` decode forwards, one token per sequence:
    step j attends to seq + j + 1 keys, a local layer to min(that, window) (its cache keeps window
    - 1 tokens and the new one). MLA with a latent cache runs kv_b over every key it reads."""
    s, b, g, n = c.seq, c.batch, c.gen_tokens, len(c)
    keys = b * (g * s + g * (g + 1) / 2.0)
    keys_local = b * sum_min(s + 1, s + g, c.window)
    latent = (c.mla == 1) & (c.mla_latent_cache == 1)
    glob = Pass(layers=np.ones(n), calls=g, tokens=b, qk=keys, pairs=keys, keys=keys,
                kv_rows=np.where(latent, keys, b * g), x_grad=np.zeros(n), training=np.zeros(n), cache=np.ones(n),
                dropless=dropless)
    return glob, replace(glob, qk=keys_local, pairs=keys_local, keys=keys_local,
                         kv_rows=np.where(latent, keys_local, b * g))


def head(c: Columns, rows: Array, calls: Array, training: bool) -> tuple[Array, Array, Array, Array]:
    """The LM head, F.linear(x, W), W (V x h) the head or the tied embedding: (forward, backward,
    forward bytes, backward bytes). Training: the input's gradient (every adapter is below it) and
    the weight's where it trains; the loss's traffic, `LOSS_BYTES_PER_LOGIT` (or a fused kernel's,
    `FUSED_*_BYTES_PER_LOGIT`) half each way. The other elementwise passes (ELEMENTWISE_*) already
    count a norm and a gated activation as one kernel each, as the fused kernels run them."""
    z = sizes(c)
    trains = (1 - c.lora) * float(training)
    op = matmul_op(rows, c.hidden, c.vocab, calls * c.vocab * c.hidden, float(training), trains, 0.0,
                   z.other_weight, z.other_weight_backward, z.act, z.grad)
    per_logit = np.select([c.fused_loss == 1, (c.fused_ce == 1) | (c.compiled_loss == 1)],
                          [FUSED_LINEAR_LOSS_BYTES_PER_LOGIT, FUSED_LOSS_BYTES_PER_LOGIT], LOSS_BYTES_PER_LOGIT)
    loss = float(training) * rows * c.vocab * per_logit / 2.0
    return op.forward, op.backward, op.forward_bytes + loss, op.backward_bytes + loss


def elementwise_bytes(c: Columns, tokens: Array) -> Array:
    """Norms, residual adds and the MLP's activation (`ELEMENTWISE_*` passes per layer), and the
    embedding's gather (a row read and written per token), rough."""
    ffn = ((c.layers - c.moe_layers) * c.ffn + c.moe_layers * (c.experts_per_token * c.expert_ffn + c.shared_ffn)) / c.layers
    per_layer = ELEMENTWISE_HIDDEN_PASSES * c.hidden + ELEMENTWISE_FFN_PASSES * ffn
    return (c.layers * per_layer + 2.0 * c.hidden) * tokens * compute_bytes(c)


def kv_width(c: Columns) -> Array:
    """KV cache elements per token and layer of one sequence: K and V, or MLA's latent."""
    return np.where(c.mla == 1, np.where(c.mla_latent_cache == 1, c.kv_lora_rank + c.rope_head_dim,
                                         c.heads * (c.head_dim + c.v_head_dim)),
                    c.kv_heads * (c.head_dim + c.v_head_dim))


def optimizer_flops(c: Columns) -> Array:
    """Elementwise FLOPs of one optimizer step: per updated parameter, by optimizer (constants above)."""
    adam = (c.optimizer_states == 2) & (c.opt_8bit == 0)
    per_param = np.select(
        [c.opt_8bit == 1, c.opt_lion == 1, c.opt_adafactor == 1, adam, c.optimizer_states == 1],
        [ADAM_FLOPS_PER_PARAM + ADAM_8BIT_EXTRA_FLOPS_PER_PARAM, LION_FLOPS_PER_PARAM,
         ADAFACTOR_FLOPS_PER_PARAM + c.opt_first_moment * ADAFACTOR_FIRST_MOMENT_FLOPS_PER_PARAM,
         ADAM_FLOPS_PER_PARAM, SGD_FLOPS_PER_PARAM + MOMENTUM_FLOPS_PER_PARAM],
        SGD_FLOPS_PER_PARAM)
    return c.training * per_param * updated_params(c)


def optimizer_step_bytes(c: Columns) -> Array:
    """HBM bytes of one optimizer step, per updated parameter: the parameter read and written and
    its gradient read (3 x the trainable dtype), and the states read and written in their format
    (Adam: m and v; SGD momentum: one buffer; 8-bit AdamW: two 8-bit states with their block absmax;
    Lion: an fp32 momentum; Adafactor: its factored vectors (negligible), an fp32 first moment with
    beta1 and `ADAFACTOR_TEMPORARY_PASSES` over its fp32 update). With 16-bit compute parameters
    (param_dtype, offload) the fp32 master is read and written and the 16-bit copy written instead.
    Unsharded; an offloaded optimizer is stepped by the CPU (counted here all the same)."""
    n, tb = updated_params(c), trainable_bytes(c)
    param_grad = 3.0 * tb + (c.param_policy == 1) * (2.0 * FP32 + 2.0 - 2.0 * tb)
    adam = (c.optimizer_states == 2) & (c.opt_8bit == 0)
    states = np.select(
        [c.opt_8bit == 1, c.opt_lion == 1, c.opt_adafactor == 1, adam, c.optimizer_states == 1],
        [4.0 * tq.BNB_8BIT_BYTES, 2.0 * FP32, c.opt_first_moment * 2.0 * FP32 + ADAFACTOR_TEMPORARY_PASSES * FP32,
         (ADAM_STEP_TENSOR_PASSES - 3.0) * tb, 2.0 * tb],
        0.0)
    return c.training * n * (param_grad + states)


def training_work(c: Columns, dropless: bool = False) -> tuple[Array, ...]:
    """One micro-batch: (forward, backward, recompute, attention, causal FLOPs, forward and backward
    bytes), the blocks and the LM head. Liger's fused linear cross-entropy (`loss.fused`) computes
    the head's gradients inside the forward."""
    glob, local = prompt_passes(c, training=True, dropless=dropless)
    w = blocks(c, glob, local, first_x_grad=1 - c.lora)
    t = c.batch * c.seq
    h_fwd, h_bwd, h_fwd_b, h_bwd_b = head(c, t, np.ones(len(c)), training=True)
    fused = c.fused_loss
    elem = elementwise_bytes(c, t)
    return (w.forward + h_fwd + fused * h_bwd, w.backward + (1 - fused) * h_bwd, w.recompute, w.attention,
            w.causal, w.forward_bytes + h_fwd_b + elem, w.backward_bytes + h_bwd_b + ELEMENTWISE_BACKWARD_FACTOR * elem)


def inference_work(c: Columns, dropless: bool = False) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """(matmul FLOPs, attention FLOPs, causal attention FLOPs, bytes) of the prefill and of the
    decode steps. The prefill's head sees the last position (`prefill_logits=last`) or every one
    (`all`, whose fp32 upcast is read and written, and an encoder, which returns every position's
    logits); a decode step's, one token per sequence. Bytes add the KV cache written (the prompt's,
    then one token per step) to what the ops read (each step: every weight and the cache so far)."""
    b, s, g = c.batch, c.seq, c.gen_tokens
    z = sizes(c)
    decoder = c.family != 2
    w = blocks(c, *prompt_passes(c, training=False, dropless=dropless), first_x_grad=np.zeros(len(c)))
    all_logits = (c.prefill_all_logits == 1) | ~decoder
    one = np.ones(len(c))
    h_fwd, _, h_bytes, _ = head(c, np.where(all_logits, b * s, b), one, training=False)
    upcast = (c.prefill_all_logits == 1) * decoder * b * s * c.vocab * (z.act + FP32)
    kv_written = decoder * c.layers * b * s * kv_width(c) * z.kv
    prefill = (w.forward + h_fwd, w.attention, w.causal,
               w.forward_bytes + h_bytes + elementwise_bytes(c, b * s) + kv_written + upcast)

    wd = blocks(c, *decode_passes(c, dropless), first_x_grad=np.zeros(len(c)))
    dh_fwd, _, dh_bytes, _ = head(c, g * b, g, training=False)
    dec_bytes = wd.forward_bytes + dh_bytes + elementwise_bytes(c, g * b) + c.layers * g * b * kv_width(c) * z.kv
    on = decoder & (g > 0)
    decode = tuple(np.where(on, x, 0.0) for x in (wd.forward + dh_fwd, wd.attention, wd.causal, dec_bytes))
    return prefill, decode


def step_work(c: Columns, *, dropless: bool = False) -> Work:
    """The work of every row's step (module docstring): training rows get forward, backward,
    recompute and optimizer; the others prefill and decode.

    `dropless`: the routed experts compute exactly t·k token copies per forward (a dropless grouped
    GEMM: MegaBlocks, vLLM's fused MoE) instead of the reference's E x ceil(t·k / E) padded rows,
    which at small batches run every expert (a decode step of one sequence through Mixtral runs 8
    experts, not 2). Default: as the reference runs it (what FlopCounterMode counts)."""
    train = c.training == 1
    ga = c.grad_accum
    fwd, bwd, rc, att, causal, fwd_b, bwd_b = training_work(c, dropless)
    prefill, decode = inference_work(c, dropless)
    zero = np.zeros(len(c))

    def tr(x: Array) -> Array:
        return np.where(train, ga * x, zero)

    def inf(x: Array) -> Array:
        return np.where(train, zero, x)

    return Work(
        forward_flops=tr(fwd), backward_flops=tr(bwd), recompute_flops=tr(rc), optimizer_flops=optimizer_flops(c),
        prefill_flops=inf(prefill[0]), decode_flops=inf(decode[0]),
        attention_flops=np.where(train, ga * att, prefill[1] + decode[1]),
        causal_attention_flops=np.where(train, ga * causal, prefill[2] + decode[2]),
        forward_bytes=tr(fwd_b), backward_bytes=tr(bwd_b), optimizer_bytes=optimizer_step_bytes(c),
        prefill_bytes=inf(prefill[3]), decode_bytes=inf(decode[3]))


def mla_cache_expansion_flops(c: Columns) -> Array:
    """The part of `decode_flops` MLA with a latent cache spends re-expanding the cached latents
    through kv_b at every step (the reference's and transformers' DeepSeek decode: 2·L·b·r_kv·h·
    (d_nope + d_v) per cached token and step). Weight-absorbed kernels (vLLM's and SGLang's MLA,
    FlashMLA) attend in the latent space and skip it (their attention then reads r_kv + d_rope per
    key instead of the expanded heads: a time model that assumes them subtracts this)."""
    s, b, g = c.seq, c.batch, c.gen_tokens
    cached = b * (g * s + g * (g + 1) / 2.0 - g)  # keys read beyond the step's own token
    on = (c.mla == 1) & (c.mla_latent_cache == 1) & (c.training == 0) & (c.family != 2)
    nope = c.head_dim - c.rope_head_dim
    return np.where(on, c.layers * mm_flops(cached, c.kv_lora_rank, c.heads * (nope + c.v_head_dim)), 0.0)
