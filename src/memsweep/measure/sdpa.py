"""`F.scaled_dot_product_attention` as CUDA runs it, for steps traced on CPU tensors (`measure=fake`).

SDPA picks its kernel at run time, and the kernels keep different tensors for the backward:
flash, cuDNN and memory-efficient attention keep q, k, v, the output and a row log-sum-exp; the
math fallback keeps fp32 copies of q, k and v and the fp32 s x s probabilities of every head. A
CPU picks by CPU rules (its own flash kernel takes no dropout and no differing head sizes), so a
fake measurement on the CPU device would measure a kernel no GPU user runs: DeepSeek-V3's 192 / 128
heads take the CPU's math kernel (118.7 GiB at 8k prefill) where a GPU runs a fused one.

`cuda_sdpa(capability)` replaces the call, while active, by CUDA's choice for a GPU of that
compute capability and that kernel's own ATen op, whose meta kernel and autograd formula make
and keep exactly the tensors the CUDA kernel does (`_scaled_dot_product_flash_attention`,
`_scaled_dot_product_cudnn_attention`, `_scaled_dot_product_efficient_attention`,
`_scaled_dot_product_attention_math`), with the pre-processing `scaled_dot_product_attention`
does around each (aten/src/ATen/native/transformers/attention.cpp): a bool mask becomes an additive
mask in the query's dtype; memory-efficient attention expands it to (B, H, T, S) and pads its last
dimension to a multiple of 16 (`preprocess_mask`, which materialises it when S is not one); flash
pads head sizes to a multiple of 8. Under autocast the inputs are cast first (CUDA autocast lists
`scaled_dot_product_attention` as lower precision).

The choice is `memsweep.sdpa_rules.choose` (torch's sdp_utils.cpp rules). Kernel-internal workspaces (flash's fp32 dq accumulator in the
backward) are not tensors autograd sees; neither ATen's meta kernels nor this module count them.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F

from memsweep.sdpa_rules import Call, choose


def _mask_kind(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> str:
    if mask is None:
        return "none"
    if mask.requires_grad or mask.size(-2) not in (q.size(2), 1) or mask.size(-1) not in (k.size(2), 1):
        return "other"
    if mask.dim() == 2:
        return "ok"
    if mask.dim() == 4 and mask.size(0) in (1, q.size(0)) and mask.size(1) in (1, q.size(1)):
        return "ok"
    return "other"


def call_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            dropout: float, is_causal: bool, enable_gqa: bool) -> Call:
    return Call(dtype=str(q.dtype).removeprefix("torch."), batch=q.size(0), heads=q.size(1), kv_heads=k.size(1),
                t=q.size(2), s=k.size(2), d_qk=q.size(-1), d_v=v.size(-1), mask=_mask_kind(mask, q, k),
                dropout=dropout, is_causal=is_causal, enable_gqa=enable_gqa,
                requires_grad=torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)),
                offsets=math.gcd(q.storage_offset(), k.storage_offset(), v.storage_offset()),
                stride1=all(x.stride(-1) == 1 or x.size(-1) == 1 for x in (q, k, v)))


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`convert_boolean_attn_mask`: a bool mask as a new additive one (0 / -inf) in `dtype`."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask.logical_not(), float("-inf"))


def _efficient_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`preprocess_mask`: expanded to (B, H, T, S); S padded to a multiple of 16 (materialised)."""
    mask = mask.expand(q.size(0), q.size(1), q.size(2), k.size(2))
    s = mask.size(-1)
    if s % 16:
        return F.pad(mask, (0, 16 - s % 16))[..., :s]
    if any(mask.stride(i) % 16 for i in range(3)):
        return mask.contiguous()
    return mask


def run(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
        dropout: float, is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor:
    """The output of `kernel`, through its ATen op (the tensors it makes and autograd keeps)."""
    aten = torch.ops.aten
    lse = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    mask = _additive(mask, q.dtype)
    if kernel == "cudnn":
        return aten._scaled_dot_product_cudnn_attention(q, k, v, mask, lse, dropout, is_causal, False, scale=scale)[0]
    if kernel == "flash":
        d = q.size(-1)
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        pad = (8 - d % 8) % 8
        if pad:
            q, k, v = (F.pad(x, (0, pad)) for x in (q, k, v))
        out = aten._scaled_dot_product_flash_attention(q, k, v, dropout, is_causal, False, scale=scale)[0]
        return out[..., :d] if pad else out
    if kernel == "efficient":
        if mask is not None:
            mask = _efficient_mask(mask, q, k)
        return aten._scaled_dot_product_efficient_attention(q, k, v, mask, lse, dropout, is_causal, scale=scale)[0]
    return aten._scaled_dot_product_attention_math(q, k, v, mask, dropout, is_causal, None, scale=scale,
                                                   enable_gqa=enable_gqa)[0]


_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


class _Swapped:
    """While active, `torch.nn.functional.scaled_dot_product_attention` is `self.attend`, and
    `kernels` counts the calls per kernel. The function itself is replaced, not intercepted by a
    thread-local mode: a checkpoint's recomputation runs inside the backward, where a
    TorchFunctionMode is not active, and must pick the same kernel as the forward did.
    transformers and the reference models look the function up at each call."""

    def __init__(self) -> None:
        self.kernels: Counter[str] = Counter()
        self._saved = F.scaled_dot_product_attention

    def __enter__(self):
        self._saved = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self.attend
        return self

    def __exit__(self, *exc) -> None:
        F.scaled_dot_product_attention = self._saved

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        raise NotImplementedError

    def summary(self) -> str | None:
        """The kernels used, most calls first ("cudnn", "flash+math"); None without a call."""
        return "+".join(k for k, _ in self.kernels.most_common()) or None


_F_DROPOUT = F.dropout


def cuda_dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002 (F.dropout's signature)
    """`F.dropout` as ATen runs it on a CUDA tensor (aten/src/ATen/native/Dropout.cpp): with
    0 < p < 1 in training, the fused `native_dropout`, whose autograd keeps a bool mask (1 byte an
    element); on a CPU tensor ATen takes `_dropout` instead, a noise tensor in the input's dtype
    (2 or 4 bytes), which a fake trace on the CPU device would count. p = 0, eval and in-place
    dropout run as on the CPU (the same code on both)."""
    if inplace or not training or not 0 < p < 1 or input.numel() == 0:
        return _F_DROPOUT(input, p, training, inplace)
    return torch.native_dropout(input, p, True)[0]


class cuda_sdpa(_Swapped):  # noqa: N801 (a context manager)
    """SDPA runs the kernel CUDA would pick on a GPU of compute capability `cap` (module docstring),
    and `F.dropout` CUDA's fused kernel (`cuda_dropout`).

    SDPA's math kernel with dropout still draws its mask inside the ATen op, by the CPU's rule (a
    noise tensor in the probabilities' fp32 where CUDA keeps a bool mask)."""

    def __init__(self, cap: tuple[int, int]) -> None:
        super().__init__()
        self.cap = cap

    def __enter__(self):
        F.dropout = cuda_dropout
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        F.dropout = _F_DROPOUT
        super().__exit__(*exc)

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        if torch.is_autocast_enabled("cpu"):  # CUDA autocast: lower_precision_fp
            dtype = torch.get_autocast_dtype("cpu")
            query, key, value = (x.to(dtype) if x.is_floating_point() else x for x in (query, key, value))
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(dtype)
        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            kernel = "math"
        else:
            kernel = choose(call_of(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa), self.cap)
        self.kernels[kernel] += 1
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            return run(kernel, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


BACKEND_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
"""torch.nn.attention.SDPBackend's values, as `torch._fused_sdp_choice` returns them."""


class observe_sdpa(_Swapped):  # noqa: N801
    """Counts the kernel the device's own rule picks (`torch._fused_sdp_choice`: CUDA's on a GPU,
    the CPU's on a CPU) and runs the call unchanged (`measure=cuda`, `measure=cpu`)."""

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        cast = [query, key, value]
        if torch.is_autocast_enabled(query.device.type):  # what the call's autocast will pass on
            dtype = torch.get_autocast_dtype(query.device.type)
            cast = [x.detach().to(dtype).requires_grad_(x.requires_grad)
                    if x.is_floating_point() and x.dtype != dtype else x for x in cast]
        choice = int(torch._fused_sdp_choice(*cast, attn_mask, dropout_p, is_causal, scale=scale,
                                             enable_gqa=enable_gqa))
        del cast
        self.kernels[BACKEND_NAMES.get(choice, str(choice))] += 1
        return self._saved(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                           is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
