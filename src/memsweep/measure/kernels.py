"""The fused kernels of `kernels` (issue 30) as autograd Functions that keep what each kernel keeps.

Each Function saves for its backward exactly the tensors the real kernel passes to
`ctx.save_for_backward`, in the same dtypes, and allocates the same outputs; the arithmetic in
between runs op by op inside `one_kernel()`, which stops the tracker from counting those
temporaries as a peak (a Triton kernel keeps them in registers). So `measure=fake` traces a fused
step with the same code as an eager one, and `measure=cpu` checks the numbers. Sources (read for
what is saved; no code copied), docs/kernels.md:

- RMSNorm / LayerNorm: Liger-Kernel `ops/rms_norm.py` (`LigerRMSNormFunction`: X, W, RSTD, RSTD
  fp32 in the llama and gemma casting modes; Y in X's dtype) and `ops/layer_norm.py` (X, W, B,
  Mean, RSTD); flash-attn's `ops/triton/layer_norm.py` keeps the same (x, weight, bias, rstd, mean).
  The backward here writes a new dX (flash-attn's; Liger's RMSNorm may write it into dY).
- gated activation: Liger `ops/swiglu.py` / `ops/geglu.py` (`LigerSiLUMulFunction`: saves a and b,
  the gate's and the up projection's outputs; the backward recomputes silu(a) and writes da and db
  into a's and b's storage).
- rotary: Liger `ops/rope.py` (`LigerRopeFunction`: rotates q and k in place, saves cos and sin).
- cross-entropy: flash-attn `ops/triton/cross_entropy.py` (saves the logits and an fp32
  log-sum-exp per row; `inplace_backward=True` writes the gradient into the logits' storage);
  Liger `ops/fused_linear_cross_entropy.py` (the head and the loss chunk by chunk in the forward,
  saving grad_input and grad_weight; chunk rule in formulas/techniques.liger_chunk_tokens).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from memsweep.measure.tracker import StorageTracker


def trackers() -> list[StorageTracker]:
    """The storage trackers running now (none outside a measurement)."""
    return [m for m in _get_current_dispatch_mode_stack() if isinstance(m, StorageTracker)]


@contextmanager
def one_kernel() -> Iterator[None]:
    """Run the ops inside as one fused kernel: what they allocate and free in between is not a
    peak of the trackers running now; what is alive when the block ends (the kernel's outputs) is."""
    live = trackers()
    for t in live:
        t.hold_peaks += 1
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        for t in live:
            t.hold_peaks -= 1
            t._update_peaks()


def _up(x: Tensor) -> Tensor:
    """x in fp32 when it is 16-bit (the kernels compute in fp32), else as it is (fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.size(-1))


class FusedRMSNorm(torch.autograd.Function):
    """y = (x * rstd).to(x.dtype) * w, rstd = 1 / sqrt(mean(x^2) + eps) in fp32 (Liger's llama
    casting mode); saves x, w and rstd (fp32, one per row)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float) -> Tensor:
        with one_kernel():
            x32 = _up(x)
            rstd = torch.rsqrt(x32.pow(2).mean(-1) + eps)  # (...,) fp32 (fp64 for fp64)
            y = torch.empty_like(x)
            y.copy_((x32 * rstd.unsqueeze(-1)).to(x.dtype) * w)
            del x32
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, w, rstd = ctx.saved_tensors
        dx = torch.empty_like(x)
        dw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        with one_kernel():
            xhat = _up(x) * rstd.unsqueeze(-1)
            g = _up(dy) * _up(w)
            dx.copy_(rstd.unsqueeze(-1) * (g - xhat * (g * xhat).mean(-1, keepdim=True)))
            if dw is not None:
                dw.copy_(_rows(_up(dy) * xhat).sum(0))
            del xhat, g
        return dx, dw, None


class FusedLayerNorm(torch.autograd.Function):
    """LayerNorm in one kernel: saves x, w, b, and the mean and rstd of each row (fp32)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
        with one_kernel():
            x32 = _up(x)
            mean = x32.mean(-1)
            rstd = torch.rsqrt((x32 - mean.unsqueeze(-1)).pow(2).mean(-1) + eps)
            xhat = (x32 - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
            y = torch.empty_like(x)
            y.copy_(xhat * _up(w) + (_up(b) if b is not None else 0.0) if w is not None else xhat)
            del x32, xhat
        ctx.save_for_backward(x, w, b, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, w, b, mean, rstd = ctx.saved_tensors
        dx = torch.empty_like(x)
        dw = torch.empty_like(w) if w is not None and ctx.needs_input_grad[1] else None
        db = torch.empty_like(b) if b is not None and ctx.needs_input_grad[2] else None
        with one_kernel():
            xhat = (_up(x) - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
            g = _up(dy) * (_up(w) if w is not None else 1.0)
            dx.copy_(rstd.unsqueeze(-1) * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)))
            if dw is not None:
                dw.copy_(_rows(_up(dy) * xhat).sum(0))
            if db is not None:
                db.copy_(_rows(_up(dy)).sum(0))
            del xhat, g
        return dx, dw, db, None


def _gelu_tanh(a: Tensor) -> Tensor:
    return 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a.pow(3))))


class FusedGatedActivation(torch.autograd.Function):
    """c = act(a) * b in one kernel (act: SiLU or tanh-GELU, in fp32): saves a and b; the
    backward recomputes act(a) and writes da and db into a's and b's storage (Liger)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, silu: bool) -> Tensor:
        with one_kernel():
            a32 = _up(a)
            act = F.silu(a32) if silu else _gelu_tanh(a32)
            c = torch.empty_like(a)
            c.copy_(act * _up(b))
            del a32, act
        ctx.save_for_backward(a, b)
        ctx.silu = silu
        return c

    @staticmethod
    def backward(ctx, dc: Tensor) -> tuple[Tensor | None, ...]:
        a, b = ctx.saved_tensors
        with one_kernel():
            a32 = _up(a.detach()).requires_grad_(True)
            with torch.enable_grad():
                act = F.silu(a32) if ctx.silu else _gelu_tanh(a32)
            (dact,) = torch.autograd.grad(act, a32, _up(dc) * _up(b))
            db = _up(dc) * act.detach()
            del a32, act
            a.copy_(dact)  # da into a's storage, db into b's: no new tensor
            b.copy_(db)
            del dact, db
        return a, b, None


def fused_gated(a: Tensor, b: Tensor, silu: bool) -> Tensor:
    return FusedGatedActivation.apply(a, b, silu)


class FusedRope(torch.autograd.Function):
    """Rotate q (B, nh, T, hs) by cos / sin (T, hs) in place in q's (B, T, nh, hs) storage, as
    Liger's kernel does; saves cos and sin. The backward rotates the gradient back."""

    @staticmethod
    def forward(ctx, q: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        qt = q.transpose(1, 2).contiguous()  # (B, T, nh, hs): the projection's own storage
        with one_kernel():
            rotated = _rotate(qt, cos.unsqueeze(1), sin.unsqueeze(1))
            qt.copy_(rotated)
            del rotated
        ctx.save_for_backward(cos, sin)
        return qt.transpose(1, 2)

    @staticmethod
    def backward(ctx, dq: Tensor) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        dqt = dq.transpose(1, 2).contiguous()
        with one_kernel():
            back = _rotate(dqt, cos.unsqueeze(1), -sin.unsqueeze(1))
            dqt.copy_(back)
            del back
        return dqt.transpose(1, 2), None, None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin over the last dim (the 'rotate half' layout of HF Llama)."""
    x1, x2 = _up(x).chunk(2, dim=-1)
    return _up(x) * _up(cos) + torch.cat((-x2, x1), dim=-1) * _up(sin)


def fused_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.size(-1) dims of x (B, nh, T, hs) in place; the rest pass through."""
    rot = cos.size(-1)
    if rot < x.size(-1):
        # partial rotary: the kernel rotates a slice of each head in place
        return torch.cat((FusedRope.apply(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    return FusedRope.apply(x, cos, sin)


def _row_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(log-sum-exp, loss) of each row of logits (n, V), in fp32 (fp64 for fp64)."""
    lse = torch.logsumexp(_up(logits), dim=-1)
    return lse, lse - _up(logits.gather(1, targets[:, None]).squeeze(1))


def _row_gradient(logits: Tensor, lse: Tensor, targets: Tensor) -> Tensor:
    """d loss / d logits of each row: softmax minus the target's one-hot."""
    grad = torch.exp(_up(logits) - lse[:, None])
    return grad.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))


class FusedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of logits (n, V) in their own dtype: saves the logits and an fp32
    log-sum-exp per row; the backward writes the gradient into the logits' storage
    (flash-attn's cross_entropy_loss with inplace_backward=True)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32 (fp64 stays fp64)
        loss = torch.empty(logits.size(0), dtype=acc, device=logits.device)
        lse = torch.empty(logits.size(0), dtype=acc, device=logits.device)
        with one_kernel():
            row_lse, row_loss = _row_loss(logits, targets)
            lse.copy_(row_lse)
            loss.copy_(row_loss)
            del row_lse, row_loss
        ctx.save_for_backward(logits, lse, targets)
        return loss

    @staticmethod
    def backward(ctx, dloss: Tensor) -> tuple[Tensor | None, ...]:
        logits, lse, targets = ctx.saved_tensors
        with one_kernel():
            grad = _row_gradient(logits, lse, targets)
            logits.copy_(grad * _up(dloss[:, None]))
            del grad
        return logits, None


def fused_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """The mean cross-entropy of logits (n, V) against targets (n,), one fused kernel."""
    return FusedCrossEntropy.apply(logits, targets).mean()


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Liger's fused linear cross-entropy: the head x @ W^T and the loss, chunk by chunk of
    `chunk` tokens, in the forward; each chunk's logits (in the matmul's dtype) get their gradient
    in place, which makes that chunk's grad_input rows and adds to grad_weight (zeros_like the
    weight). Saves grad_input (and grad_weight when the head trains); the backward returns them."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        n = x.size(0)
        grad_input = torch.zeros_like(x)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        loss = torch.zeros(n, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for start in range(0, n, chunk):
            xc, tc = x[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(xc, weight)  # the chunk's logits, in autocast's dtype when it runs
            with one_kernel():  # Liger's cross-entropy kernel: the loss, then the gradient in place
                lse, loss[start:start + chunk] = _row_loss(logits, tc)
                grad = _row_gradient(logits, lse, tc)
                logits.copy_(grad / n)
                del grad, lse
            grad_input[start:start + chunk] = logits @ weight  # (chunk, h): a matmul, then the copy
            if grad_weight is not None:
                with one_kernel():  # torch.addmm(..., out=grad_weight): accumulated in place
                    grad_weight.add_((logits.t() @ xc.to(logits.dtype)).to(grad_weight.dtype))
            del logits
        ctx.save_for_backward(grad_input, grad_weight)
        return loss.sum() / n

    @staticmethod
    def backward(ctx, dloss: Tensor) -> tuple[Tensor | None, ...]:
        grad_input, grad_weight = ctx.saved_tensors
        grad_input.mul_(dloss)  # in place (Liger skips it when the output's gradient is 1)
        if grad_weight is not None:
            grad_weight.mul_(dloss)
        return grad_input, grad_weight, None, None


def fused_linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
    """The mean cross-entropy of the head's logits x (n, h) @ weight (V, h)^T against targets."""
    return FusedLinearCrossEntropy.apply(x, weight, targets, chunk)
