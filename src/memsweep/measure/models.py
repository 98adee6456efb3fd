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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from memsweep.specs import ModelSpec

ATTENTIONS = ("sdpa", "eager")
RECOMPUTES = ("none", "selective", "full")
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

    def linear(self, name: str, d_in: int, d_out: int, bias: bool) -> nn.Linear:
        """A linear layer, with a LoRA adapter when `name` is one of the targets."""
        factory = {"dtype": self.dtype, "device": self.device}
        if self.lora_rank > 0 and name in self.lora_targets:
            return LoRALinear(d_in, d_out, bias, self.lora_rank, **factory)
        return nn.Linear(d_in, d_out, bias=bias, **factory)


class LoRALinear(nn.Linear):
    """y = W x + b + (alpha / r) * B A x, the low-rank update of Hu et al. 2021 (no dropout)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, rank: int, **factory) -> None:
        super().__init__(d_in, d_out, bias=bias, **factory)
        self.lora_a = nn.Parameter(torch.empty(rank, d_in, **factory))  # (r, d_in)
        self.lora_b = nn.Parameter(torch.empty(d_out, rank, **factory))  # (d_out, r)
        alpha = LORA_ALPHA_PER_RANK * rank
        self.scale = alpha / rank
        # B = 0 makes the adapted model start exactly at the pretrained one.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(x, self.lora_a), self.lora_b)  # (..., r) -> (..., d_out)
        return F.linear(x, self.weight, self.bias) + update * self.scale


class RMSNorm(nn.Module):
    """x / rms(x) * g (Zhang & Sennrich 2019), weight only, as Llama uses it."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 like Llama's reference code: bf16 sums of squares lose precision,
        # and the fp32 copy is part of the activation memory the real models pay for.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _norm(spec: ModelSpec, opts: _Options) -> nn.Module:
    if spec.norm == "rmsnorm":
        return RMSNorm(spec.hidden, 1e-5, opts.dtype, opts.device)
    eps = 1e-12 if spec.family == "bert" else 1e-5  # the HF configs' layer_norm_eps
    return nn.LayerNorm(spec.hidden, eps=eps, dtype=opts.dtype, device=opts.device)


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
    """Rotate pairs (x_i, x_{i + hs/2}) of x (B, nh, T, hs) by the position's angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, opts: _Options) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = spec.heads, spec.kv_heads, spec.dim_per_head
        q_dim, kv_dim = spec.heads * self.head_dim, spec.kv_heads * self.head_dim
        self.q = opts.linear("q", spec.hidden, q_dim, spec.qkv_bias)
        self.k = opts.linear("k", spec.hidden, kv_dim, spec.qkv_bias)
        self.v = opts.linear("v", spec.hidden, kv_dim, spec.qkv_bias)
        self.o = opts.linear("o", q_dim, spec.hidden, spec.out_bias)
        self.causal = spec.decoder
        self.eager = opts.attention == "eager"
        self.selective = opts.recompute == "selective"

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None,
                kv_cache: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache  # (B, nkv, max_tokens, hs), written in place
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]  # (B, nkv, S, hs)
        if self.selective and self.training and torch.is_grad_enabled():
            # Keep only q, k, v; the scores, softmax and AV are recomputed in the backward.
            y = checkpoint(self._attend, q, k, v, start, use_reentrant=False,
                           preserve_rng_state=False)  # no dropout, so no RNG state to replay
        else:
            y = self._attend(q, k, v, start)  # (B, nh, T, hs)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
        """softmax(q k^T / sqrt(hs)) v for q (B, nh, T, hs) over keys (B, nkv, S, hs)."""
        T, S = q.size(2), k.size(2)
        if self.n_kv_head != self.n_head:  # GQA: each K/V head serves n_head / n_kv_head heads
            n_rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(n_rep, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(n_rep, dim=1)  # (B, nh, S, hs)
        # One new token sees every cached key, so only T > 1 needs a mask. After cached tokens
        # (start > 0) the causal diagonal is shifted, which sdpa's is_causal (top-left) is not.
        causal = self.causal and T > 1
        mask = None
        if causal and (start > 0 or self.eager):
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device)  # (T, S)
            mask = mask.tril(diagonal=start)  # query i sees keys 0..start+i
        if not self.eager:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  is_causal=causal and mask is None)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return F.softmax(scores, dim=-1) @ v  # (B, nh, T, hs)


class MLP(nn.Module):
    """GELU h -> ffn -> h (gpt2, bert) or SwiGLU down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, spec: ModelSpec, opts: _Options) -> None:
        super().__init__()
        self.gated = spec.mlp == "swiglu"
        if self.gated:
            self.gate = opts.linear("gate", spec.hidden, spec.ffn, spec.mlp_bias)
        self.up = opts.linear("up", spec.hidden, spec.ffn, spec.mlp_bias)
        self.down = opts.linear("down", spec.ffn, spec.hidden, spec.mlp_bias)
        # GPT-2 uses the tanh approximation ("gelu_new"); BERT the exact erf form.
        self.approximate = "tanh" if spec.family == "gpt2" else "none"

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.down(F.silu(self.gate(x)) * self.up(x))  # (B, T, h)
        return self.down(F.gelu(self.up(x), approximate=self.approximate))  # (B, T, h)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, opts: _Options) -> None:
        super().__init__()
        self.ln_1 = _norm(spec, opts)
        self.attn = Attention(spec, opts)
        self.ln_2 = _norm(spec, opts)
        self.mlp = MLP(spec, opts)
        self.post_norm = spec.family == "bert"  # BERT normalises after each residual add

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None,
                kv_cache: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        if self.post_norm:
            x = self.ln_1(x + self.attn(x, rope, kv_cache, start))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), rope, kv_cache, start)
        return x + self.mlp(self.ln_2(x))


@dataclass
class KVCache:
    """Preallocated keys and values, one (B, kv_heads, max_tokens, head_dim) tensor per layer."""

    k: list[Tensor]
    v: list[Tensor]
    length: int = 0
    """Tokens written so far; the next forward's positions start here."""

    @property
    def max_tokens(self) -> int:
        return self.k[0].size(2)


class ReferenceModel(nn.Module):
    def __init__(self, spec: ModelSpec, opts: _Options) -> None:
        super().__init__()
        self.spec = spec
        self.recompute = opts.recompute
        h, factory = spec.hidden, {"dtype": opts.dtype, "device": opts.device}
        self.tok_emb = nn.Embedding(spec.vocab, h, **factory)
        self.pos_emb = (nn.Embedding(spec.max_positions, h, **factory)
                        if spec.position == "learned" else None)
        self.type_emb = nn.Embedding(spec.type_vocab, h, **factory) if spec.type_vocab else None
        self.emb_norm = _norm(spec, opts) if spec.family == "bert" else None
        self.blocks = nn.ModuleList(Block(spec, opts) for _ in range(spec.layers))
        self.norm_f = _norm(spec, opts) if spec.decoder else None
        # Tied: the head reuses tok_emb.weight, so it adds no parameter.
        self.lm_head = (None if spec.tied_embeddings
                        else nn.Linear(h, spec.vocab, bias=False, **factory))
        # Counted as HF's BertModel counts it, but not run: MLM logits do not use it (HF's
        # BertForMaskedLM drops it too), so in training it gets no gradient.
        self.pooler = nn.Linear(h, h, **factory) if spec.pooler else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # LoRA A and B keep their own init (B = 0); only the pretrained weights are reset here.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: Tensor, cache: KVCache | None = None,
                last_only: bool = False) -> Tensor:
        """input_ids (B, T) int64 -> logits (B, T, V), or (B, 1, V) when last_only.

        With a cache, positions start at cache.length and the new K/V are written into it
        (cache.length advances by T).
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
        if self.pos_emb is not None:
            if start + T > self.spec.max_positions:
                raise ValueError(f"{self.spec.name} has {self.spec.max_positions} learned "
                                 f"positions; {start + T} requested")
            positions = torch.arange(start, start + T, device=input_ids.device)  # (T,)
            x = x + self.pos_emb(positions)  # (B, T, h)
        if self.type_emb is not None:
            x = x + self.type_emb.weight[0]  # token type 0 everywhere
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        rope = None
        if self.spec.position == "rope":
            rope = rope_cos_sin(start, T, self.spec.dim_per_head, x.dtype, x.device)  # (T, hs) each

        full = self.recompute == "full" and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            if full:
                # Keep only each block's input; everything inside is recomputed in the backward.
                x = checkpoint(block, x, rope, kv, start, use_reentrant=False,
                               preserve_rng_state=False)  # no dropout, no RNG state to replay
            else:
                x = block(x, rope, kv, start)
        if cache is not None:
            cache.length = start + T

        if last_only:
            x = x[:, -1:, :]  # (B, 1, h): norm and head are per token, so slice first
        if self.norm_f is not None:
            x = self.norm_f(x)
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight  # (V, h)
        return F.linear(x, head)  # (B, T, V)

    def new_cache(self, batch: int, max_tokens: int) -> KVCache:
        """An empty cache for `batch` sequences of up to `max_tokens` tokens (decoders only)."""
        if not self.spec.decoder:
            raise ValueError(f"{self.spec.name} is an encoder: it has no KV cache")
        w = self.tok_emb.weight
        shape = (batch, self.spec.kv_heads, max_tokens, self.spec.dim_per_head)
        k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(self.spec.layers)]
        v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(self.spec.layers)]
        return KVCache(k, v)

    def lora_parameters(self) -> list[nn.Parameter]:
        """Adapter weights (A and B of every adapted linear); empty without LoRA."""
        return [p for m in self.modules() if isinstance(m, LoRALinear)
                for p in (m.lora_a, m.lora_b)]

    def base_parameters(self) -> list[nn.Parameter]:
        """The pretrained weights: every parameter but the adapters (tied weights once)."""
        adapters = {id(p) for p in self.lora_parameters()}
        return [p for p in self.parameters() if id(p) not in adapters]


def build_model(spec: ModelSpec, *, attention: str = "sdpa", recompute: str = "none",
                lora_rank: int = 0, lora_targets: tuple[str, ...] = (),
                dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> ReferenceModel:
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
        allowed = ("q", "k", "v", "o", "gate", "up", "down") if spec.mlp == "swiglu" else (
            "q", "k", "v", "o", "up", "down")
        bad = [t for t in lora_targets if t not in allowed]
        if bad or not lora_targets:
            raise ValueError(f"lora_targets={list(lora_targets)}: expected a non-empty subset "
                             f"of {allowed} for {spec.name}")
    opts = _Options(attention, recompute, lora_rank, frozenset(lora_targets), dtype, device)
    model = ReferenceModel(spec, opts)
    if lora_rank > 0:
        for p in model.base_parameters():
            p.requires_grad_(False)
    return model
