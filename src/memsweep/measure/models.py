"""Plain PyTorch reference models built from a `ModelSpec`: gpt2, llama (mistral, qwen) and bert.

These are what the measure backends run (on a GPU, on the CPU, or under `FakeTensorMode`), so the
module tree mirrors the HF models the presets describe: the parameter count equals
`memsweep.columns.base_params` exactly, and LoRA adapters equal `columns.lora_params`.

Structure follows the spec's fields (norm, mlp, position, biases, tying); the family only picks
the block layout (pre-LN decoder or post-LN encoder), causality, and the bert extras (token types,
embedding norm, pooler). The forward avoids `.item()`, data-dependent branches and numpy, so it
runs under `FakeTensorMode` and on the meta device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from memsweep.measure import kernels
from memsweep.specs import ModelSpec, lora_targets_of

ATTENTIONS = ("sdpa", "eager")
RECOMPUTES = ("none", "selective", "full", "op")
FUSABLE = ("norm", "mlp", "rope")
"""The ops `kernels` can fuse inside the model (the loss is the training step's: measure/workloads)."""
ROPE_THETA = 10_000.0
INIT_STD = 0.02  # GPT-2's initializer range; values only matter for numerics, not memory
LORA_ALPHA_PER_RANK = 2  # alpha = 2r, so the update scale alpha / r is 2 whatever the rank


@dataclass(frozen=True)
class _Options:
    """How to build and run the model, beyond the architecture itself."""

    attention: str
    recompute: str
    lora_rank: int
    lora_targets: frozenset[str]
    dtype: torch.dtype
    device: torch.device | str
    lora_dropout: float = 0.0
    fused: frozenset[str] = frozenset()
    """The ops that run as fused kernels (`kernels`: norm, mlp, rope; measure/kernels.py)."""

    def linear(self, name: str, d_in: int, d_out: int, bias: bool) -> nn.Linear:
        """A linear layer, with a LoRA adapter when `name` is one of the targets."""
        factory = {"dtype": self.dtype, "device": self.device}
        if self.lora_rank > 0 and name in self.lora_targets:
            return LoRALinear(d_in, d_out, bias, self.lora_rank, self.lora_dropout, **factory)
        return nn.Linear(d_in, d_out, bias=bias, **factory)


SAC_SAVED_ATTENTION = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                       "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
"""The attention kernels whose outputs per-op selective checkpointing keeps (torchtitan's `_save_list`,
torchtitan/parallelisms/parallelize_llama.py, 2024: flash and memory-efficient; its later
distributed/activation_checkpoint.py adds cuDNN's). The CPU's flash kernel stands in for CUDA's
flash on `measure=cpu`. SDPA's math kernel and eager attention are not in it: they are recomputed."""


def per_op_sac_context():
    """torch.utils.checkpoint's `context_fn` for one block under per-op selective checkpointing as
    torchtitan runs it (`activation_checkpoint.mode=selective`, `selective_ac_option=op`): the
    output of every fused attention call and of every `aten.mm` but each second one of the block
    (counted per block, forward and recompute apart) is saved; everything else is recomputed.
    A linear with a bias runs `aten.addmm` (not in the list: recomputed), a batched matmul `bmm`."""
    from collections import defaultdict

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    attention = {getattr(torch.ops.aten, name).default for name in SAC_SAVED_ATTENTION
                 if hasattr(torch.ops.aten, name)}
    mm = torch.ops.aten.mm.default
    counts: dict[str, int] = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        key = "recompute" if ctx.is_recompute else "forward"
        if func == mm:
            counts[key] += 1
            keep = counts[key] % 2 == 1
        else:
            keep = func in attention
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """`F.dropout` as transformers and peft call it; p = 0 (or eval) returns `x` itself, as ATen's
    dropout does (no op runs). measure=fake runs CUDA's kernel for it (measure/sdpa.py)."""
    return F.dropout(x, p, training) if p > 0 and training else x


class LoRALinear(nn.Linear):
    """y = W x + b + (alpha / r) * B A dropout(x), the low-rank update of Hu et al. 2021 as peft's
    LoRA Linear runs it (`lora_dropout`: nn.Dropout, or nn.Identity when 0)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, rank: int, p_dropout: float = 0.0, **factory) -> None:
        super().__init__(d_in, d_out, bias=bias, **factory)
        self.p_dropout = p_dropout
        self.lora_a = nn.Parameter(torch.empty(rank, d_in, **factory))  # (r, d_in)
        self.lora_b = nn.Parameter(torch.empty(d_out, rank, **factory))  # (d_out, r)
        alpha = LORA_ALPHA_PER_RANK * rank
        self.scale = alpha / rank
        # B = 0 makes the adapted model start exactly at the pretrained one.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: Tensor) -> Tensor:
        # as peft's LoRA Linear: x is cast to the adapters' dtype first (fp32 adapters of a 16-bit
        # base under autocast: a transient fp32 copy, which autocast casts back to 16 bits and saves)
        # with lora_dropout the cast input is dropped first: a copy and a bool mask, kept for A's grad
        x_a = dropout(x.to(self.lora_a.dtype), self.p_dropout, self.training)
        update = F.linear(F.linear(x_a, self.lora_a), self.lora_b)  # (..., r) -> (..., d_out)
        return F.linear(x, self.weight, self.bias) + update * self.scale


class RMSNorm(nn.Module):
    """x / rms(x) * g (Zhang & Sennrich 2019), weight only, as Llama uses it; `fused`: one kernel
    (kernels.norm=fused, measure/kernels.FusedRMSNorm)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype,
                 device: torch.device | str, fused: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return kernels.FusedRMSNorm.apply(x, self.weight, self.eps)
        # Normalise in fp32 like Llama's reference code: bf16 sums of squares lose precision,
        # and the fp32 copy is part of the activation memory the real models pay for.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class L2Norm(nn.Module):
    """x / rms(x) in fp32, cast back, no weight: Llama-4's per-head query/key norm
    (transformers' Llama4TextL2Norm)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm as one kernel (kernels.norm=fused, measure/kernels.FusedLayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        return kernels.FusedLayerNorm.apply(x, self.weight, self.bias, self.eps)


def _norm(spec: ModelSpec, opts: _Options, width: int | None = None) -> nn.Module:
    """The spec's norm over `width` features (hidden by default)."""
    width = width or spec.hidden
    fused = "norm" in opts.fused
    if spec.norm == "rmsnorm":
        return RMSNorm(width, 1e-5, opts.dtype, opts.device, fused)
    eps = 1e-12 if spec.family == "bert" else 1e-5  # the HF configs' layer_norm_eps
    return (FusedLayerNorm if fused else nn.LayerNorm)(width, eps=eps, bias=spec.norm == "layernorm", dtype=opts.dtype,
                                                       device=opts.device)


def rope_cos_sin(start: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles for positions start..start+length-1 (Su et al. 2021)."""
    # Angles in fp32: bf16 positions above 256 are not even exact integers.
    inv_freq = ROPE_THETA ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                               / head_dim)  # (hs/2,)
    positions = torch.arange(start, start + length, device=device, dtype=torch.float32)  # (T,)
    angles = torch.outer(positions, inv_freq)  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs): the "rotate half" layout of HF Llama
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i + r/2}) of the first r = cos.size(-1) dims of x (B, nh, T, hs) by the
    position's angles; the rest pass through (partial rotary, GPT-NeoX)."""
    rot = cos.size(-1)
    if rot < x.size(-1):
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def window_mask(T: int, S: int, start: int, window: int, device) -> Tensor:
    """(T, S) bool: query start+i sees keys j with start+i - window < j <= start+i (HF's sliding
    window: `window` keys, itself included)."""
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start)
    too_old = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start - window)
    return causal & ~too_old


class Attention(nn.Module):
    """Multi-head attention with GQA / MQA, explicit head_dim, q/k norms, sliding windows,
    attention sinks, or DeepSeek's multi-head latent attention (MLA)."""

    def __init__(self, spec: ModelSpec, opts: _Options, local: bool = False) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = spec.heads, spec.kv_heads, spec.dim_per_head
        self.v_dim, self.rope_dim, self.mla = spec.value_dim, spec.rope_dim, spec.mla
        q_dim, kv_dim = spec.heads * self.head_dim, spec.kv_heads * self.head_dim
        if self.mla:
            # DeepSeek-V2 sec. 2.1: q from a low-rank latent (or one q_proj), a joint KV latent
            # c_kv plus one shared rotary key, expanded to per-head keys and values by kv_b.
            self.q_lora_rank, self.kv_lora_rank = spec.q_lora_rank, spec.kv_lora_rank
            # LoRA targets: q adapts q_a and q_b (or q_proj), k the joint projection kv_a, v kv_b.
            if spec.q_lora_rank:
                self.q_a = opts.linear("q", spec.hidden, spec.q_lora_rank, False)
                self.q_a_norm = RMSNorm(spec.q_lora_rank, 1e-6, opts.dtype, opts.device, "norm" in opts.fused)
                self.q_b = opts.linear("q", spec.q_lora_rank, q_dim, False)
            else:
                self.q = opts.linear("q", spec.hidden, q_dim, False)
            self.kv_a = opts.linear("k", spec.hidden, spec.kv_lora_rank + self.rope_dim, False)
            self.kv_a_norm = RMSNorm(spec.kv_lora_rank, 1e-6, opts.dtype, opts.device, "norm" in opts.fused)
            nope = self.head_dim - self.rope_dim
            self.kv_b = opts.linear("v", spec.kv_lora_rank, spec.heads * (nope + self.v_dim), False)
            self.latent_cache = spec.mla_cache == "latent"
        else:
            self.q = opts.linear("q", spec.hidden, q_dim, spec.qkv_bias)
            self.k = opts.linear("k", spec.hidden, kv_dim, spec.qkv_bias)
            self.v = opts.linear("v", spec.hidden, kv_dim, spec.qkv_bias)
        self.o = opts.linear("o", spec.heads * self.v_dim, spec.hidden, spec.out_bias)
        self.rope = kernels.fused_rope if "rope" in opts.fused else apply_rope
        self.qk_norm = spec.qk_norm
        if spec.qk_norm == "head":  # Qwen3, Gemma-3: over each head's head_dim
            self.q_norm, self.k_norm = _norm(spec, opts, self.head_dim), _norm(spec, opts, self.head_dim)
        elif spec.qk_norm == "full":  # OLMoE, Cohere: over all heads at once
            self.q_norm, self.k_norm = _norm(spec, opts, q_dim), _norm(spec, opts, kv_dim)
        elif spec.qk_norm == "l2":  # Llama-4: per head, no weight, after the rotation
            self.q_norm = self.k_norm = L2Norm()
        # gpt-oss: a learned logit per head joins every softmax (eager; sdpa has no such input).
        self.sinks = (nn.Parameter(torch.zeros(spec.heads, dtype=opts.dtype, device=opts.device))
                      if spec.attention_sinks else None)
        self.window = spec.sliding_window if local else 0
        # Gemma-2's attention soft-capping: eager only (transformers' Gemma2 has no sdpa; a fused
        # kernel that caps, flash-attn's softcap, keeps nothing more than it does without)
        self.softcap = spec.attn_softcap
        self.causal = spec.decoder
        self.cache_sink: list[tuple[Tensor, Tensor]] | None = None  # set by ReferenceModel.forward
        self.eager = opts.attention == "eager"
        # transformers' Falcon hands SDPA its causal mask and one K/V head, no enable_gqa
        self.sdpa_mask = spec.sdpa_mask and not self.eager
        self.fp32_softmax = spec.family == "llama"  # eager: see _attend
        # transformers' GPT2Block names the eager attention weights the attention returns, so they
        # live to the end of the block (its MLP included; Block.forward drops them); its other
        # models discard them at once
        self.holds_weights = spec.family == "gpt2" and self.eager and opts.recompute != "selective"
        self.held_weights: Tensor | None = None  # (selective recompute re-runs _attend alone: never held)
        self.mask_dtype = opts.dtype  # the hidden states' dtype: the weights' (fp32 when mixed)
        self.selective = opts.recompute == "selective"
        self.p_attn, self.p_hidden = spec.attention_dropout, spec.hidden_dropout
        # BERT drops the fp32 probabilities before its matmul casts them (BertSelfAttention); the
        # decoders cast to the values' dtype first, then drop (GPT2Attention, llama's eager_attention_forward)
        self.drop_before_cast = spec.family == "bert"

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None,
                kv_cache: tuple[KVCache, int] | None, start: int,
                mask: Tensor | None = None) -> Tensor:
        """`mask`: a (T, S) sliding-window mask shared by the local layers of one forward."""
        B, T, _ = x.shape
        if self.mla:
            q, k, v = self._mla_qkv(x, rope, kv_cache, start)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)  # (B, T, nh*hs), (B, T, nkv*hs) x 2
            if self.qk_norm == "full":
                q, k = self.q_norm(q), self.k_norm(k)
            q = q.view(B, T, self.n_head, self.head_dim)
            k = k.view(B, T, self.n_kv_head, self.head_dim)
            if self.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs)
            v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
            if rope is not None:
                q, k = self.rope(q, *rope), self.rope(k, *rope)
            if self.qk_norm == "l2":
                q, k = self.q_norm(q), self.k_norm(k)
            if kv_cache is not None:
                k, v = self._cache(kv_cache, k, v, start)
        if self.cache_sink is not None:
            # transformers' DynamicCache in a training forward (use_cache=True): update()
            # concatenates onto empty tensors of K's dtype (so V is promoted to it: fp32 under
            # mixed precision, where RoPE's fp32 tables make K fp32); attention reads the copies
            empty = k.new_empty(0)
            k, v = torch.cat((empty, k), dim=2), torch.cat((empty, v), dim=2)
            self.cache_sink.append((k, v))
        if not self.window and not self.eager:
            mask = None  # (eager global layers take the model's float causal mask)
        if self.selective and self.training and torch.is_grad_enabled():
            # Keep only q, k, v; the scores, softmax and AV are recomputed in the backward.
            # (the RNG state is kept to replay attention dropout, as torch's checkpoint does by default)
            y = checkpoint(self._attend, q, k, v, start, mask, use_reentrant=False,
                           preserve_rng_state=self.p_attn > 0)
        else:
            y = self._attend(q, k, v, start, mask)  # (B, nh, T, hs_v)
        out = self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.v_dim))
        return dropout(out, self.p_hidden, self.training)  # resid_pdrop / residual_dropout / hidden_dropout

    def _cache(self, kv_cache: tuple[KVCache, int], k: Tensor, v: Tensor,
               start: int) -> tuple[Tensor, Tensor]:
        """Append the new K/V (B, nkv, T, hs) to the layer's cache; return what attention reads:
        every cached token's (a local layer's window - 1 cached ones and the new, KVCache)."""
        cache, i = kv_cache
        if self.window and k.size(2) > 1 and start > 0 and start + k.size(2) > self.window:
            raise ValueError("a local layer's cache takes a prefill from 0, then one token at a time")
        return cache.append(i, k, v)  # (B, nkv, S, hs)

    def _mla_qkv(self, x: Tensor, rope: tuple[Tensor, Tensor] | None,
                 kv_cache: tuple[KVCache, int] | None, start: int) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        nope = self.head_dim - self.rope_dim
        q = self.q_b(self.q_a_norm(self.q_a(x))) if self.q_lora_rank else self.q(x)  # (B, T, nh*hs)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        q_nope, q_rope = q.split([nope, self.rope_dim], dim=-1)
        latent = self.kv_a(x)  # (B, T, r_kv + rope)
        c_kv, k_rope = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_norm(c_kv)  # (B, T, r_kv)
        k_rope = k_rope.unsqueeze(1)  # (B, 1, T, rope): one rotary key shared by all heads
        if rope is not None:
            q_rope, k_rope = self.rope(q_rope, *rope), self.rope(k_rope, *rope)
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, nh, T, hs)
        if kv_cache is not None and self.latent_cache:
            # Serving engines cache the latent (r_kv + rope per token) and expand it per step.
            cache, i = kv_cache  # (B, tokens, r_kv + rope)
            latent, _ = cache.append(i, torch.cat((c_kv, k_rope.squeeze(1)), dim=-1), cache.v[i], dim=1)
            c_kv, k_rope = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            k_rope = k_rope.unsqueeze(1)
        S = c_kv.size(1)
        kv = self.kv_b(c_kv).view(B, S, self.n_head, nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([nope, self.v_dim], dim=-1)  # (B, nh, S, nope), (B, nh, S, hs_v)
        v = v.contiguous()  # its own storage, not a view that keeps all of kv alive
        k = torch.cat((k_nope, k_rope.expand(B, self.n_head, S, self.rope_dim)), dim=-1)
        if kv_cache is not None and not self.latent_cache:
            k, v = self._cache(kv_cache, k, v, start)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, start: int,
                window: Tensor | None = None) -> Tensor:
        """softmax(q k^T / sqrt(hs)) v for q (B, nh, T, hs) over keys (B, nkv, S, hs), written as
        transformers writes it (issue 12: the same tensors saved, the same transients):
        - sdpa shares each K/V head among its query heads with `enable_gqa` when no mask is passed
          and repeats K and V otherwise (transformers' `use_gqa_in_sdpa`, CUDA: no mask, head_dim
          <= 256); eager always repeats them (`repeat_kv`);
        - eager adds a float mask (nothing saved, unlike a masked_fill's bool mask) and runs the
          softmax in fp32 for llama-family models (`softmax(..., dtype=float32).to(q.dtype)`, as
          every modern decoder in transformers does: autograd keeps the fp32 probabilities and
          their 16-bit copy) and in the scores' dtype for GPT-2 and BERT (cast to V's dtype)."""
        T, S = q.size(2), k.size(2)
        # One new token sees every cached key, so only T > 1 needs a mask. After cached tokens
        # (start > 0) the causal diagonal is shifted, which sdpa's is_causal (top-left) is not.
        causal = self.causal and T > 1
        mask = window
        if mask is None and causal and (start > 0 or self.eager or self.sdpa_mask):
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device)  # (T, S)
            mask = mask.tril(diagonal=start)  # query i sees keys 0..start+i
        dq, dv = q.size(-1), v.size(-1)
        p = self.p_attn if self.training else 0.0  # transformers: `dropout=0.0 if not self.training`
        gqa = self.n_kv_head != self.n_head
        shared = gqa and not self.eager and mask is None and dq == dv <= 256
        if gqa and not shared and not self.sdpa_mask:  # each K/V head serves n_head / n_kv_head query heads
            n_rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(n_rep, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(n_rep, dim=1)  # (B, nh, S, hs)
        if not self.eager:
            if dv != dq:
                # MLA's values and keys differ in head size; fused kernels want one, so pad the
                # narrower to the wider and slice the output (as HF's DeepSeek does for
                # FlashAttention), keeping the 1/sqrt(head_dim) scale of the real keys.
                if dv < dq:
                    v = F.pad(v, (0, dq - dv))
                else:
                    q, k = F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                     is_causal=causal and mask is None, scale=1.0 / math.sqrt(dq))
                return out[..., :dv]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal and mask is None,
                                                  enable_gqa=shared)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, S)
        if self.softcap:  # Gemma-2: tanh(scores / cap) * cap, before the mask; autograd keeps the tanh
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is not None:
            scores = scores + (mask if mask.is_floating_point() else _additive(mask, self.mask_dtype))
        if self.sinks is None:
            probs = F.softmax(scores, dim=-1, dtype=torch.float32 if self.fp32_softmax else None)
            if self.drop_before_cast:
                probs = dropout(probs, p, True).to(v.dtype)
            else:
                probs = dropout(probs.to(v.dtype), p, True)
            if self.holds_weights:
                self.held_weights = probs  # GPT2Block keeps its attention weights to the block's end
            return probs @ v  # (B, nh, T, hs)
        # gpt-oss (transformers' gpt_oss eager_attention_forward): the sink logit joins the masked
        # scores, the row maximum is subtracted (a new tensor; the scores stay referenced), and the
        # softmax runs in that dtype (`dtype=combined.dtype`, which autocast keeps). The sinks keep
        # their own dtype in the cat, which promotes: fp32 masters (mixed, sinks trained) make the
        # combined logits and probabilities fp32, cast back to the values' dtype for the matmul; a
        # frozen 16-bit base (LoRA) keeps them 16-bit, with no copy
        sink = self.sinks.view(1, -1, 1, 1).expand(q.size(0), -1, T, 1)
        combined = torch.cat((scores, sink), dim=-1)  # (B, nh, T, S + 1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
        return dropout(probs[..., :-1], p, True).to(v.dtype) @ v  # the sink takes probability mass, and adds no value


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as the float one transformers adds to the scores (0 or the dtype's minimum),
    in the dtype of the model's hidden states (a full tensor even when `mask` is an expanded view)."""
    with torch.no_grad():
        return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device),
                           torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device))


class MLP(nn.Module):
    """GELU h -> ffn -> h (gpt2, bert), or gated down(act(gate(x)) * up(x)) with SiLU (SwiGLU) or
    tanh-GELU (GeGLU, Gemma) (Shazeer 2020)."""

    def __init__(self, spec: ModelSpec, opts: _Options, ffn: int | None = None) -> None:
        super().__init__()
        ffn = ffn or spec.ffn
        self.gated = spec.mlp in ("swiglu", "geglu")
        self.silu = spec.mlp == "swiglu"
        if self.gated:
            self.gate = opts.linear("gate", spec.hidden, ffn, spec.mlp_bias)
        self.up = opts.linear("up", spec.hidden, ffn, spec.mlp_bias)
        self.down = opts.linear("down", ffn, spec.hidden, spec.mlp_bias)
        # GPT-2 uses the tanh approximation written out ("gelu_new", below), a llama-family model
        # what its hidden_act says (ModelSpec.activation); else the fused kernel: the tanh form in
        # a GeGLU (transformers' gelu_pytorch_tanh), the exact erf form otherwise (BERT, Falcon)
        self.written_out = gelu_new if spec.family == "gpt2" else WRITTEN_OUT_GELU.get(spec.activation)
        self.approximate = "tanh" if spec.mlp == "geglu" else "none"
        # kernels.mlp=fused: a gated activation is one kernel saving gate(x) and up(x); a GELU
        # one kernel (torch's, tanh form for the written-out tanh GELUs) saving its input
        self.fused = "mlp" in opts.fused
        if self.fused and self.written_out is not None:
            self.approximate = "none" if self.written_out is gelu_python else "tanh"
            self.written_out = None

    def _gelu(self, t: Tensor) -> Tensor:
        return self.written_out(t) if self.written_out else F.gelu(t, approximate=self.approximate)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated and self.fused:
            return self.down(kernels.fused_gated(self.gate(x), self.up(x), self.silu))  # (B, T, h)
        if self.gated:
            act = F.silu if self.silu else self._gelu
            return self.down(act(self.gate(x)) * self.up(x))  # (B, T, h)
        return self.down(self._gelu(self.up(x)))  # (B, T, h)


def gelu_new(x: Tensor) -> Tensor:
    """GPT-2's activation as transformers computes it (`NewGELUActivation`, op by op: autograd
    keeps x, tanh(.), 0.5x and 1 + tanh(.), and under autocast x**3 runs in fp32), Hendrycks &
    Gimpel 2016, eq. for the tanh approximation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_fast(x: Tensor) -> Tensor:
    """transformers' FastGELUActivation (`hidden_act: gelu_fast`, GPT-NeoX-20B), op by op as it is
    written there: autograd keeps x * 0.79788..., 0.044715 x, 1 + 0.044715 x^2, tanh(.), 0.5 x and
    1 + tanh(.), six t*f tensors beyond the fused kernel's input."""
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def gelu_python(x: Tensor) -> Tensor:
    """transformers' GELUActivation(use_gelu_python=True) (`hidden_act: gelu_python`): the erf form
    op by op; autograd keeps x / sqrt(2), 0.5 x and 1 + erf(.)."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


WRITTEN_OUT_GELU = {"gelu_fast": gelu_fast, "gelu_new": gelu_new, "gelu_python": gelu_python}


class Experts(nn.Module):
    """E expert MLPs as stacked weights (E, d_in, d_out), run as batched matmuls over the tokens
    grouped by expert; LoRA adapters per expert when gate / up / down are targets."""

    def __init__(self, spec: ModelSpec, opts: _Options) -> None:
        super().__init__()
        E, h, f = spec.experts, spec.hidden, spec.routed_ffn
        self.gated, self.silu = spec.mlp in ("swiglu", "geglu"), spec.mlp == "swiglu"
        factory = {"dtype": opts.dtype, "device": opts.device}
        shapes = {"up": (h, f), "down": (f, h)}
        if self.gated:
            shapes = {"gate": (h, f), **shapes}
        for name, (d_in, d_out) in shapes.items():
            self.register_parameter(f"w_{name}", nn.Parameter(torch.empty(E, d_in, d_out, **factory)))
            nn.init.normal_(getattr(self, f"w_{name}"), std=INIT_STD)
            bias = nn.Parameter(torch.zeros(E, 1, d_out, **factory)) if spec.mlp_bias else None
            self.register_parameter(f"b_{name}", bias)
            if opts.lora_rank > 0 and name in opts.lora_targets:
                a = nn.Parameter(torch.empty(E, d_in, opts.lora_rank, **factory))  # (E, d_in, r)
                nn.init.normal_(a, std=1.0 / opts.lora_rank)
                self.register_parameter(f"lora_a_{name}", a)
                self.register_parameter(f"lora_b_{name}", nn.Parameter(torch.zeros(E, opts.lora_rank, d_out, **factory)))
        self.lora_scale = LORA_ALPHA_PER_RANK

    def _linear(self, name: str, x: Tensor) -> Tensor:
        """x (E, C, d_in) -> (E, C, d_out)."""
        w, b = getattr(self, f"w_{name}"), getattr(self, f"b_{name}")
        device = x.device.type
        if w.dtype == torch.float32 and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            # transformers' experts run grouped_mm(input.to(weight.dtype), weight), which autocast
            # does not cast (integrations/moe.py, `_grouped_mm`): fp32 master weights run the
            # experts in fp32, with no 16-bit copies of the expert weights; the bias is added
            # after (`out.add_(bias)`)
            with torch.autocast(device, enabled=False):
                y = torch.bmm(x.to(w.dtype), w)
                y = y if b is None else y + b
        else:
            # baddbmm, so autocast casts the bias too and the output stays 16-bit
            y = torch.bmm(x, w) if b is None else torch.baddbmm(b, x, w)
        a = getattr(self, f"lora_a_{name}", None)
        if a is not None:
            y = y + torch.bmm(torch.bmm(x, a), getattr(self, f"lora_b_{name}")) * self.lora_scale
        return y

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            gate = self._linear("gate", x)
            act = F.silu(gate) if self.silu else F.gelu(gate, approximate="tanh")
            return self._linear("down", act * self._linear("up", x))  # (E, C, h)
        return self._linear("down", F.gelu(self._linear("up", x), approximate="tanh"))


class MoE(nn.Module):
    """A mixture-of-experts MLP: a router picks top-k experts per token (softmax in fp32), the
    token copies are grouped by expert and run dropless; shared experts see every token.

    Grouping assumes balanced routing (t*k/E copies per expert, padded up): with static shapes the
    step runs under FakeTensorMode and the bytes equal a dropless grouped-GEMM step, whose total
    (t*k copies) does not depend on the balance; see docs/models.md for the unbalanced worst case."""

    def __init__(self, spec: ModelSpec, opts: _Options) -> None:
        super().__init__()
        self.n_experts, self.top_k = spec.experts, spec.experts_per_token
        factory = {"dtype": opts.dtype, "device": opts.device}
        self.router = nn.Linear(spec.hidden, spec.experts, bias=spec.router_bias, **factory)
        self.experts = Experts(spec, opts)
        self.shared = MLP(spec, opts, ffn=spec.shared_ffn_total) if spec.shared_experts else None
        self.shared_gate = (nn.Linear(spec.hidden, 1, bias=False, **factory)
                            if spec.shared_expert_gate else None)
        self.fp32_logits = spec.router_fp32_logits

    def forward(self, x: Tensor) -> Tensor:
        B, T, h = x.shape
        E, k = self.n_experts, self.top_k
        flat = x.reshape(B * T, h)  # (t, h)
        if self.fp32_logits:  # DeepSeek: F.linear(hidden.float(), weight.float())
            r = self.router
            logits = F.linear(flat.float(), r.weight.float(), None if r.bias is None else r.bias.float())
        else:
            logits = self.router(flat)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # (t, E)
        weights, chosen = probs.topk(k, dim=-1)  # (t, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        order = chosen.flatten().argsort(stable=True)  # token copies sorted by expert, (t*k,)
        token = order // k  # the token of each copy
        n, per_expert = B * T * k, -(-B * T * k // E)  # copies, and copies per expert (balanced)
        grouped = flat[token]  # (t*k, h)
        if per_expert * E > n:
            grouped = torch.cat((grouped, grouped.new_zeros(per_expert * E - n, h)))
        out = self.experts(grouped.view(E, per_expert, h)).reshape(E * per_expert, h)[:n]
        out = out * weights.flatten()[order].unsqueeze(-1)  # (t*k, h)
        y = out.new_zeros(B * T, h).index_add(0, token, out)  # (t, h): sum over each token's k
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            y = y + shared
        return y.view(B, T, h)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, opts: _Options, index: int = 0) -> None:
        super().__init__()
        self.ln_1 = _norm(spec, opts)
        self.attn = Attention(spec, opts, local=spec.local_layers > 0 and spec.layer_kinds()[index] == "local")
        self.local = self.attn.window > 0
        self.parallel = spec.block == "parallel"
        # a parallel block may share one norm (Falcon-7B, Cohere); Gemma-2/3 add post-norms
        self.ln_2 = _norm(spec, opts) if spec.block_norms >= 2 else None
        self.sandwich = spec.block_norms == 4
        if self.sandwich:
            self.ln_post_attn, self.ln_post_mlp = _norm(spec, opts), _norm(spec, opts)
        moe = spec.experts > 0 and index >= spec.dense_layers
        self.mlp = MoE(spec, opts) if moe else MLP(spec, opts)
        self.p_hidden = spec.hidden_dropout
        self.post_norm = spec.family == "bert"  # BERT normalises after each residual add

    def _mlp(self, x: Tensor) -> Tensor:
        """The MLP and its output dropout (GPT2MLP's, Starcoder2MLP's, BertOutput's, GPT-NeoX's
        post_mlp_dropout), as the attention's output has its own (Attention.forward)."""
        return dropout(self.mlp(x), self.p_hidden, self.training)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None,
                kv_cache: tuple[KVCache, int] | None, start: int,
                mask: Tensor | None = None) -> Tensor:
        if self.post_norm:
            x = self.ln_1(x + self.attn(x, rope, kv_cache, start))
            return self.ln_2(x + self._mlp(x))
        if self.parallel:  # x + attn(norm(x)) + mlp(norm'(x)) (GPT-J / GPT-NeoX)
            if self.ln_2 is None:
                h = self.ln_1(x)
                return x + self.attn(h, rope, kv_cache, start, mask) + self._mlp(h)
            return x + self.attn(self.ln_1(x), rope, kv_cache, start, mask) + self._mlp(self.ln_2(x))
        # no named temporaries: the attention output must die at the add, as in a plain block
        if self.sandwich:
            x = x + self.ln_post_attn(self.attn(self.ln_1(x), rope, kv_cache, start, mask))
            return x + self.ln_post_mlp(self._mlp(self.ln_2(x)))
        a = self.attn(self.ln_1(x), rope, kv_cache, start, mask)
        # GPT2Block's attention weights are a local of the block's forward: alive through its MLP,
        # gone when it returns, or when a checkpoint's recomputation stops early inside it (an
        # attribute would outlive both)
        held, self.attn.held_weights = self.attn.held_weights, None  # noqa: F841
        x = x + a
        del a  # the attention output dies at the add, as in a plain block
        return x + self._mlp(self.ln_2(x))


@dataclass
class KVCache:
    """Keys and values, one (B, kv_heads, tokens, head_dim) tensor each per layer, grown as
    transformers' DynamicCache grows them (issue 12): every forward concatenates its new K and V
    onto the layer's (a new tensor; the old one dies once replaced). A local layer keeps a view of
    its last `window - 1` tokens (DynamicSlidingWindowLayer), which holds the storage of the whole
    concatenation until the next step replaces it: after a prefill, the prompt's K and V. MLA with
    a latent cache keeps one (B, tokens, kv_lora_rank + rope_head_dim) tensor per layer in `k`
    and an empty one in `v`."""

    k: list[Tensor]
    v: list[Tensor]
    max_tokens: int
    windows: list[int]
    """Per layer: the window of a local layer, 0 for a global one."""
    length: int = 0
    """Tokens written so far; the next forward's positions start here."""
    tracker: object = None
    """A StorageTracker (or None): what the cache holds is counted as kv_cache when it is made."""

    def _tag(self, i: int) -> None:
        if self.tracker is not None:
            for t in (self.k[i], self.v[i]):
                if t.numel():
                    self.tracker.retag(t, "kv_cache")

    def append(self, i: int, k: Tensor, v: Tensor, dim: int = 2) -> tuple[Tensor, Tensor]:
        """Layer i's cache grows by k, v (along `dim`, the tokens); returns every token's K and V."""
        def cat(old: Tensor, new: Tensor) -> Tensor:
            return torch.cat((old, new), dim=dim) if old.numel() or new.numel() else old

        keep = self.windows[i] - 1
        if not self.windows[i]:  # DynamicLayer: keys replaced before values are concatenated
            self.k[i] = cat(self.k[i], k)
            self.v[i] = cat(self.v[i], v)
            self._tag(i)
            return self.k[i], self.v[i]
        k_all, v_all = cat(self.k[i], k), cat(self.v[i], v)  # DynamicSlidingWindowLayer: both first
        self.k[i] = k_all.narrow(dim, max(k_all.size(dim) - keep, 0), min(keep, k_all.size(dim)))
        self.v[i] = v_all.narrow(dim, max(v_all.size(dim) - keep, 0), min(keep, v_all.size(dim))) if v_all.numel() else v_all
        self._tag(i)
        return k_all, v_all

    def jump(self, tokens: int) -> None:
        """Append `tokens` positions to every layer in one concatenation, as decoding them would
        leave the cache (fake runs decode only the last token: see workloads.prepare); the new
        tokens are stride-0 views with no storage of their own."""
        for i in range(len(self.k)):
            dim = 1 if self.k[i].dim() == 3 else 2
            has_v = self.v[i].numel() > 0  # (no local names for the old tensors: they die when replaced)
            self.append(i, new_tokens(self.k[i], dim, tokens),
                        new_tokens(self.v[i], dim, tokens) if has_v else self.v[i], dim)
            if self.windows[i] and self.k[i].size(dim) == self.windows[i] - 1:
                self.k[i] = as_a_decode_step_leaves_it(self.k[i], dim)
                if has_v:
                    self.v[i] = as_a_decode_step_leaves_it(self.v[i], dim)
                self._tag(i)
        self.length += tokens


def new_tokens(t: Tensor, dim: int, tokens: int) -> Tensor:
    """`tokens` positions shaped like `t` along `dim`, as a stride-0 view: no storage of their own
    (a cache jump appends them in one concatenation, as decoding them would)."""
    shape = list(t.shape)
    shape[dim] = 1
    return t.new_zeros(shape).expand(*[tokens if d == dim else n for d, n in enumerate(shape)])


def as_a_decode_step_leaves_it(t: Tensor, dim: int) -> Tensor:
    """A sliding layer's cached tokens as a decode step leaves them: its (window)-token
    concatenation viewed as the last window - 1 tokens (DynamicSlidingWindowLayer.update), the
    same storage size, not a jump's longer one."""
    return torch.cat((t.narrow(dim, 0, 1), t), dim=dim).narrow(dim, 1, t.size(dim))


class ReferenceModel(nn.Module):
    def __init__(self, spec: ModelSpec, opts: _Options) -> None:
        super().__init__()
        self.spec = spec
        self.recompute = opts.recompute
        self.eager = opts.attention == "eager"
        h, factory = spec.hidden, {"dtype": opts.dtype, "device": opts.device}
        self.tok_emb = nn.Embedding(spec.vocab, h, **factory)
        self.pos_emb = (nn.Embedding(spec.max_positions, h, **factory)
                        if spec.position == "learned" else None)
        self.type_emb = nn.Embedding(spec.type_vocab, h, **factory) if spec.type_vocab else None
        self.emb_norm = _norm(spec, opts) if spec.family == "bert" else None
        self.blocks = nn.ModuleList(Block(spec, opts, i) for i in range(spec.layers))
        self.norm_f = _norm(spec, opts) if spec.decoder else None
        # Tied: the head reuses tok_emb.weight, so it adds no parameter.
        self.lm_head = (None if spec.tied_embeddings
                        else nn.Linear(h, spec.vocab, bias=False, **factory))
        # Counted as HF's BertModel counts it, but not run: MLM logits do not use it (HF's
        # BertForMaskedLM drops it too), so in training it gets no gradient.
        self.pooler = nn.Linear(h, h, **factory) if spec.pooler else None
        self.keep_train_cache = False  # workload.use_cache (set by measure.workloads)
        self.dropout = spec.dropout or opts.lora_dropout > 0
        self.train_cache: list[tuple[Tensor, Tensor]] | None = None
        # kernels.compile: each block runs as AOTAutograd's partitioned graphs (measure/compiled.py)
        self.compiler = None
        # tensor parallel (measure/parallel.py): (x, head weight) -> the vocabulary-sharded logits
        self.vocab_parallel: Callable[[Tensor, Tensor], Tensor] | None = None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # LoRA A and B keep their own init (B = 0); only the pretrained weights are reset here.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: Tensor, cache: KVCache | None = None,
                last_only: bool = False, chunks: int = 1, hidden: bool = False) -> Tensor | list[Tensor]:
        """input_ids (B, T) int64 -> logits (B, T, V), or (B, 1, V) when last_only, or with
        `chunks` > 1 a list of the logits of `chunks` sequence chunks (torchtune's chunked output).

        With a cache, positions start at cache.length and the new K/V are written into it
        (cache.length advances by T). `hidden`: the final norm's output (B, T, h) instead of the
        logits (a fused linear cross-entropy runs the head itself).
        """
        B, T = input_ids.shape
        start = 0
        if cache is not None:
            if not self.spec.decoder:
                raise ValueError(f"{self.spec.name} is an encoder: it has no KV cache")
            start = cache.length
            if start + T > cache.max_tokens:
                raise ValueError(f"KV cache holds {cache.max_tokens} tokens; "
                                 f"{start} cached + {T} new do not fit")
        x = self.tok_emb(input_ids)  # (B, T, h)
        # a decoder's forward holds its embeddings to the end, as transformers' does (its local
        # `inputs_embeds`, and GPT-2's `position_embeds`): inside a prefill, one t*h more
        held = [x] if self.spec.decoder else []
        if self.pos_emb is not None:
            if start + T > self.spec.max_positions:
                raise ValueError(f"{self.spec.name} has {self.spec.max_positions} learned "
                                 f"positions; {start + T} requested")
            positions = torch.arange(start, start + T, device=input_ids.device)  # (T,)
            pos = self.pos_emb(positions)  # (T, h)
            held.append(pos)
            x = x + pos  # (B, T, h)
        if self.type_emb is not None:
            x = x + self.type_emb.weight[0]  # token type 0 everywhere
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        # GPT2Model's `drop`, Starcoder2's embedding_dropout, BertEmbeddings' dropout (after its norm)
        x = dropout(x, self.spec.embedding_dropout, self.training)
        rope = None
        if self.spec.position == "rope":
            rope = rope_cos_sin(start, T, self.spec.rope_dim, x.dtype, x.device)  # (T, rd) each
        window = self.spec.sliding_window
        mask = None  # one sliding-window mask for every local layer, as HF builds it per forward
        if self.spec.local_layers and T > 1 and start + T > window:
            if start > 0:
                raise ValueError("local layers take a prefill from position 0, then one token at a time")
            # (B, 1, T, T), a view of one (T, T): transformers passes its mask with the batch
            # dimension, so sdpa's float conversion of it (saved for the backward) is per sequence
            mask = window_mask(T, T, 0, window, x.device)[None, None].expand(B, 1, T, T)
        causal_mask = None
        if self.eager and self.spec.decoder and T > 1:
            # eager: transformers builds each mask once per forward as a float (B, 1, T, S) in the
            # hidden states' dtype (`torch.where(allowed, 0, min)`), held to the end of the forward
            # and, under recompute, by every checkpoint until its backward (detailed: eager_mask_bytes)
            allowed = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            allowed = allowed[None, None].expand(B, 1, T, start + T)
            if self.spec.layers > self.spec.local_layers:
                causal_mask = _additive(allowed, x.dtype)
            if self.spec.local_layers:  # the sliding-window mask (causal while the window covers all)
                mask = _additive(allowed if mask is None else mask, x.dtype)
            del allowed  # (transformers' bool masks die inside its mask functions)

        full = self.recompute in ("full", "op") and self.training and torch.is_grad_enabled()
        # per-op selective (torchtitan's): a checkpoint per block that keeps what the policy saves
        extra = {"context_fn": per_op_sac_context} if self.recompute == "op" else {}
        # training: what transformers' output holds until the loss is computed (the training loop
        # drops `train_cache` then): with use_cache every layer's K and V copies (transformers
        # turns it off under checkpointing), and the final hidden state
        keep = cache is None and self.training and torch.is_grad_enabled() and self.spec.decoder
        self.train_cache = [] if keep else None
        # (a compiled block runs as graphs: transformers' cache update is Python it never runs)
        use_cache = keep and self.keep_train_cache and not full and self.compiler is None
        for block in self.blocks:
            block.attn.cache_sink = self.train_cache if use_cache else None
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else (cache, i)
            compiled = self.compiler is not None and cache is None and self.training and torch.is_grad_enabled()
            if compiled and full:
                self.compiler.prepare(block, x, rope, mask if block.local else causal_mask)
                x = checkpoint(self.compiler, block, x, rope, mask if block.local else causal_mask,
                               use_reentrant=False, preserve_rng_state=self.dropout, **extra)
            elif compiled:
                x = self.compiler(block, x, rope, mask if block.local else causal_mask)
            elif full:
                # Keep only each block's input; everything inside is recomputed in the backward.
                x = checkpoint(block, x, rope, kv, start, mask if block.local else causal_mask,
                               use_reentrant=False, preserve_rng_state=self.dropout, **extra)  # replays dropout
            else:
                x = block(x, rope, kv, start, mask if block.local else causal_mask)
        for block in self.blocks:
            block.attn.cache_sink = None
        if cache is not None:
            cache.length = start + T

        if last_only:
            x = x[:, -1:, :]  # (B, 1, h): norm and head are per token, so slice first
        if self.norm_f is not None:
            x = self.norm_f(x)
        if keep:  # transformers' model output holds the last hidden state while the loss runs
            self.train_cache.append((x, x))
        del held  # transformers' model forward returns before its LM head runs
        if hidden:
            return x
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight  # (V, h)
        if self.vocab_parallel is not None:
            return self._cap(self.vocab_parallel(x, head))  # (B, T, V / tp) on each rank
        if chunks > 1:
            return [self._cap(F.linear(part, head)) for part in x.chunk(chunks, dim=1)]  # [(B, T / N, V)]
        return self._cap(F.linear(x, head))  # (B, T, V)

    @property
    def head_weight(self) -> Tensor:
        """The LM head's weight (V, h): the token embedding's when tied."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def _cap(self, logits: Tensor) -> Tensor:
        """Gemma-2's final soft-capping, as its ForCausalLM writes it: divide, tanh, multiply (three
        logit-sized tensors made; autograd keeps the tanh's)."""
        cap = self.spec.final_softcap
        if not cap:
            return logits
        logits = logits / cap
        logits = torch.tanh(logits)
        return logits * cap

    def new_cache(self, batch: int, max_tokens: int) -> KVCache:
        """An empty cache for `batch` sequences of up to `max_tokens` tokens (decoders only)."""
        if not self.spec.decoder:
            raise ValueError(f"{self.spec.name} is an encoder: it has no KV cache")
        s, w = self.spec, self.tok_emb.weight
        factory = {"dtype": w.dtype, "device": w.device}
        k, v = [], []
        for _ in self.blocks:
            if s.mla and s.mla_cache == "latent":
                k.append(torch.zeros(batch, 0, s.kv_lora_rank + s.rope_head_dim, **factory))
                v.append(torch.zeros(0, **factory))
                continue
            heads = s.heads if s.mla else s.kv_heads
            k.append(torch.zeros(batch, heads, 0, s.dim_per_head, **factory))
            v.append(torch.zeros(batch, heads, 0, s.value_dim, **factory))
        windows = [block.attn.window if block.local else 0 for block in self.blocks]
        return KVCache(k, v, max_tokens, windows)

    def lora_parameters(self) -> list[nn.Parameter]:
        """Adapter weights (A and B of every adapted linear and expert); empty without LoRA."""
        return [p for n, p in self.named_parameters() if n.rsplit(".", 1)[-1].startswith("lora_")]

    def base_parameters(self) -> list[nn.Parameter]:
        """The pretrained weights: every parameter but the adapters (tied weights once)."""
        adapters = {id(p) for p in self.lora_parameters()}
        return [p for p in self.parameters() if id(p) not in adapters]


def build_model(spec: ModelSpec, *, attention: str = "sdpa", recompute: str = "none",
                lora_rank: int = 0, lora_targets: tuple[str, ...] = (), lora_dropout: float = 0.0,
                dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", fused: tuple[str, ...] = (),
                compile: bool = False) -> ReferenceModel:
    """The reference model of `spec`, its parameters in `dtype` on `device`.

    `device="meta"` builds without memory (for counting); under `FakeTensorMode` the parameters
    are fake. With `lora_rank > 0` every base parameter is frozen and only the adapters on
    `lora_targets` (q, k, v, o, gate, up, down) train; with `lora_rank == 0` targets are ignored.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}: expected one of {ATTENTIONS}")
    if recompute not in RECOMPUTES:
        raise ValueError(f"recompute={recompute!r}: expected one of {RECOMPUTES}")
    if lora_rank < 0:
        raise ValueError(f"lora_rank={lora_rank}: expected an integer >= 0")
    if lora_rank > 0:
        allowed = lora_targets_of(spec)
        bad = [t for t in lora_targets if t not in allowed]
        if bad or not lora_targets:
            raise ValueError(f"lora_targets={list(lora_targets)}: expected a non-empty subset "
                             f"of {allowed} for {spec.name}")
    bad = [f for f in fused if f not in FUSABLE]
    if bad:
        raise ValueError(f"fused={list(fused)}: expected a subset of {FUSABLE}")
    opts = _Options(attention, recompute, lora_rank, frozenset(lora_targets), dtype, device, lora_dropout, frozenset(fused))
    model = ReferenceModel(spec, opts)
    if compile:
        from memsweep.measure.compiled import Compiler

        model.compiler = Compiler()
    if lora_rank > 0:
        for p in model.base_parameters():
            p.requires_grad_(False)
    return model
