"""Reference optimizers whose *memory* matches the libraries people train with.

memsweep measures a training step's live tensor bytes (`tracker.StorageTracker`, under
FakeTensorMode or on the CPU) and compares them with analytic formulas. The optimizers below keep
the same state tensors (names, shapes, dtypes) as the libraries they stand in for, and their steps
allocate what the libraries' steps allocate (bitsandbytes' fused kernels: nothing; transformers'
Adafactor: its fp32 copies), so a measured step means the same thing as a run with the library. They were written from the papers' algorithms; library sources were read for
facts only (state layout, defaults, block size). None needs a GPU, a compiled extension or
`.item()`: every branch depends on shapes, dtypes and Python numbers, never on tensor values, so
all three run on FakeTensorMode tensors.

AdamW8bit (and PagedAdamW8bit)
    Block-wise 8-bit AdamW: Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via
    Block-wise Quantization", ICLR 2022 (arXiv:2110.02861); the state as `bitsandbytes.optim.
    AdamW8bit` keeps it (bitsandbytes/optim/optimizer.py, `Optimizer2State.init_state`; defaults
    from bitsandbytes/optim/adamw.py: lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=1e-2, min_8bit_size=4096):

    * numel >= min_8bit_size: `state1` (m) and `state2` (v) uint8 of numel elements,
      `absmax1`, `absmax2` float32 of ceil(numel / block_size) elements, and `qmap1` / `qmap2`,
      the signed / unsigned 256-entry float32 "dynamic" code maps, one pair shared by every
      parameter (bitsandbytes puts the same two tensors in every parameter's state: 2 KiB in all);
    * numel < min_8bit_size: `state1`, `state2` float32 of numel elements (bitsandbytes falls
      back to its 32-bit kernel for small tensors);
    * `step` (a Python int).

    State bytes per 8-bit parameter: 2 * numel + 8 * ceil(numel / block_size); per small one:
    8 * numel; plus 2048 bytes once (the two code maps).

    Block size: 256 elements. bitsandbytes hard-codes `blocksize = 256` in
    `Optimizer2State.init_state` / `Optimizer1State.init_state` since 0.44.0 (commit aa57bd89,
    PR #1365, "Change 8bit optimizer blocksize 2048->256", 2024-09-20); releases up to 0.43.3
    used 2048 (`blocks = n // 2048`). The newest main-branch snapshot read (commit 95f9af30,
    after release 0.50.1) still uses 256, as does its pure-PyTorch fallback
    (backends/triton/kernels_optim.py); pass `block_size=2048` to model bitsandbytes <= 0.43.

    The code maps are the "dynamic tree" data type of the paper (and of Dettmers 2016,
    arXiv:1511.04561), as `bitsandbytes.functional.create_dynamic_map` builds it: for
    decimal exponents 10^-6 .. 10^0, linearly spaced fractions in [0.1, 1] (2^e of them signed,
    2^(e+1) unsigned, e = 0..6, each the middle of its bin), plus 0 and 1. Quantizing a block
    divides it by its absolute maximum and rounds to the nearest code.

    `paged=True` (the `PagedAdamW8bit` subclass) is recorded in `self.paged` and changes
    nothing else: bitsandbytes pages (CUDA unified memory) only buffers of >= 1e5 elements on a
    GPU, falls back to ordinary buffers on the CPU, and a paged buffer still occupies the same
    bytes.

    Step memory: the fused CUDA kernel allocates nothing, and neither does a traced step here:
    the update of one parameter is one custom op (`memsweep::adam8bit_update`, or
    `memsweep::adam32_update` below min_8bit_size) that mutates the parameter and its states. Inside
    it, the CPU runs in slices of at most `slice_elements` elements (m and v of a slice dequantized
    to fp32, the code look-ups in sub-chunks of 1/8 of a slice), which a tracker does not see, as it
    would not see a CUDA kernel's registers (tests/test_optimizers_impl.py: transient 0).

Lion
    Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023 (arXiv:2302.06675):
    c = sign(beta1 * m + (1 - beta1) * g); p <- p * (1 - lr * wd) - lr * c;
    m <- beta2 * m + (1 - beta2) * g. One state, `exp_avg`, per parameter. Its dtype:
    `state_fp32=True` (the default) keeps it in float32 whatever the parameter's dtype, as
    bitsandbytes' 32-bit Lion does (`bitsandbytes.optim.Lion`, optim_bits=32 ->
    `Optimizer1State.init_state` -> `get_state_buffer(p, dtype=torch.float32)`);
    `state_fp32=False` keeps it in the parameter's dtype, as lion-pytorch does
    (lucidrains/lion-pytorch, lion_pytorch/lion_pytorch.py: `torch.zeros_like(p)`). Defaults as
    both: lr=1e-4, betas=(0.9, 0.99), weight_decay=0. State bytes: 4 * numel (state_fp32) or
    numel * param element size. The step is one custom op (`memsweep::lion_update`), as
    bitsandbytes' fused kernel: no transient (its fp32 sign of a slice stays inside).

Adafactor
    Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018
    (arXiv:1804.04235), following Hugging Face transformers' `transformers.optimization.
    Adafactor` (transformers 5.23.0, transformers/optimization.py; itself from fairseq) step by
    step, with the same arguments and defaults (lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0,
    decay_rate=-0.8, beta1=None, weight_decay=0.0, scale_parameter=True, relative_step=True,
    warmup_init=False). State per parameter:

    * `step` (Python int), `RMS` (a 0-dim float32 tensor: 4 bytes);
    * >= 2 dims: `exp_avg_sq_row` of shape[:-1] and `exp_avg_sq_col` of shape[:-2] + shape[-1:];
      1 dim: `exp_avg_sq` of numel;
    * `exp_avg` of numel only when beta1 is not None.

    HF casts a 16-bit gradient to float32 *before* creating the state (`grad = grad.float()`,
    then `torch.zeros_like(grad)` / `torch.zeros(...).to(grad)`), so the state is float32 for
    fp32, bf16 and fp16 parameters alike. State bytes for a (rows, cols) matrix:
    4 * (rows + cols) + 4, plus 4 * numel with beta1; for a vector 4 * numel + 4 (+ 4 * numel).

    The one deviation from HF: with `scale_parameter=True`, HF's `_get_lr` takes
    `max(eps[1], state["RMS"])` in Python, a data-dependent branch that FakeTensorMode cannot run;
    here that factor is `RMS.clamp(min=eps[1])`, a 0-dim tensor (same value, 4 bytes). Every
    full-size tensor is made exactly where HF makes it, and Python names hold them as long as
    HF's do, so the transient is HF's. With n = numel and fp32 temporaries of 4n bytes each:

    * 16-bit parameter: `grad.float()` (G) and `p.float()` (P) live through the whole
      parameter's update; the peak, 4 temporaries = 16n bytes, is reached three times: at
      `update = grad**2 + eps` (G, P, grad**2, the sum), at `update = _approx_sq_grad(row, col)`
      (G, P, the old update, the r x c product; for a vector: `exp_avg_sq.rsqrt()`), and at
      `p_data_fp32.add_(-update)` (G, P, update, -update; only 3 with beta1, whose update is
      then the `exp_avg` state);
    * fp32 parameter: G is `p.grad` and P is `p` themselves, so the peak is 2 temporaries = 8n;
    * plus small tensors: at the r x c product, r_factor (4 * rows bytes) and c_factor
      (4 * cols bytes) are alive, and with scale_parameter (the default) the 0-dim lr (4 bytes).

    Measured under FakeTensorMode (tests/test_optimizers_impl.py), one 2048 x 4096 matrix:
    bf16/fp16 16n + 4 * (2048 + 4096) + 4 = 134,242,308 bytes; fp32 8n + 24,580 = 67,133,444;
    the same with beta1 (the peak comes before exp_avg takes over the update); a 1-D parameter
    16n + 4 / 8n + 4. On real CPU tensors these transients equal transformers.Adafactor's own,
    byte for byte (the tests compare the two under the StorageTracker).

    Across parameters: with beta1=None the Python name `update` keeps the previous parameter's
    last update (4 * n_prev bytes) alive until `update = grad**2 + eps` of the next one has been
    computed, so in HF's for-loop over many parameters the step's transient is the max over
    parameters of T + max(4 * (rows + cols), 4 * n_prev) + 4 (lr), T = 16n (16-bit) or 8n
    (fp32), n_prev the previous parameter's numel (0 for the first): two equal
    2048 x 4096 matrices give 20n + 4 (bf16) and 12n + 4 (fp32). With beta1 the leftover is the
    `exp_avg` state and nothing leaks. (`grad` and `p_data_fp32` are rebound before anything
    large is allocated, so they do not leak.)

`optimizer_state_bytes(opt)` sums the storage bytes of every tensor in `opt.state`, each storage
once (the shared 8-bit code maps count once), as the StorageTracker counts them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.optim import Optimizer

__all__ = ["AdamW8bit", "PagedAdamW8bit", "Lion", "Adafactor", "dynamic_code",
           "optimizer_state_bytes"]

_TINY = 1e-30  # stands in for a zero block maximum when normalising (codes of 0 stay 0)
_SUBCHUNKS = 8  # index conversions run over 1/8 of a slice at a time


def optimizer_state_bytes(opt: Optimizer) -> int:
    """Bytes of every tensor storage in `opt.state`, each storage counted once."""
    seen: dict[int, int] = {}
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                storage = v.untyped_storage()
                seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


# --- 8-bit block-wise quantization helpers ---------------------------------------------------


def dynamic_code(signed: bool) -> list[float]:
    """The 256 sorted values of the 8-bit dynamic (tree) data type.

    Decimal exponent 10^(e-6) for e = 0..6; for each, the centres of 2^e (signed; each also
    negated) or 2^(e+1) (unsigned) equal bins of [0.1, 1]; plus 0 and 1.
    """
    values = [0.0, 1.0]
    for e in range(7):
        bins = 2 ** e if signed else 2 ** (e + 1)
        scale = 10.0 ** (e - 6)
        width = 0.9 / bins
        for k in range(bins):
            x = scale * (0.1 + width * (k + 0.5))
            values.append(x)
            if signed:
                values.append(-x)
    assert len(values) == 256
    return sorted(values)


def _block_views(x: torch.Tensor, block: int) -> Iterator[tuple[torch.Tensor, int, int]]:
    """A 1-D tensor starting on a block boundary as 2-D views (whole blocks, then the partial
    last block), each with the range of block indices it covers (relative to x's start)."""
    n = x.numel()
    full = n // block
    if full:
        yield x[: full * block].view(full, block), 0, full
    if n % block:
        yield x[full * block:].view(1, n - full * block), full, full + 1


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block: int,
                chunk: int) -> torch.Tensor:
    """float32 values of a slice of codes: qmap[code] * absmax of its block."""
    n = codes.numel()
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    for s in range(0, n, chunk):
        torch.index_select(qmap, 0, codes[s:s + chunk].int(), out=out[s:s + chunk])
    for view, b0, b1 in _block_views(out, block):
        view.mul_(absmax[b0:b1].unsqueeze(1))
    return out


def _quantize_into(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                   bounds: torch.Tensor, signed: bool, block: int, chunk: int) -> None:
    """Store x (float32, left unchanged) as per-block absmax and the nearest code of x / absmax.

    `bounds` are the 255 midpoints between consecutive codes; searchsorted finds the nearest.
    """
    for view, b0, b1 in _block_views(x, block):
        if signed:
            lo, hi = torch.aminmax(view, dim=1)
            absmax[b0:b1].copy_(torch.maximum(hi, lo.neg_()))
            del lo, hi
        else:
            absmax[b0:b1].copy_(view.amax(dim=1))
    scale = absmax.clamp_min(_TINY)
    for s in range(0, x.numel(), chunk):  # chunk is a multiple of block
        part = x[s:s + chunk]
        first = s // block
        for view, b0, b1 in _block_views(part, block):
            normed = view / scale[first + b0:first + b1].unsqueeze(1)
            at = s + b0 * block
            codes[at:at + normed.numel()].copy_(
                torch.searchsorted(bounds, normed.view(-1), out_int32=True))
            del normed


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1)


def _write_param(p_slice: torch.Tensor, update: torch.Tensor, decay: float, scale: float) -> None:
    """p <- p * decay + scale * update, computed in float32, stored in p's dtype.

    `update` (float32, a temporary of the caller's) is overwritten when p is not float32."""
    if p_slice.dtype == torch.float32:
        if decay != 1.0:
            p_slice.mul_(decay)
        p_slice.add_(update, alpha=scale)
    else:
        update.mul_(scale).add_(p_slice, alpha=decay)  # p promoted to float32 inside the op
        p_slice.copy_(update)


def _run_closure(closure):
    """torch.optim's convention: re-evaluate the loss with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _with_grads(opt: Optimizer):
    """(group, parameter) for every parameter with a dense gradient, both made contiguous first
    (as bitsandbytes' update_step does)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(opt).__name__} does not support sparse gradients")
            if not p.is_contiguous():
                p.data = p.data.contiguous()
            if not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            yield group, p


# --- the update kernels -------------------------------------------------------------------------
# Each is one custom op, as bitsandbytes' fused CUDA kernels are one launch: a traced step sees the
# states it mutates and nothing else (the slices' fp32 temporaries inside are the kernel's
# registers, not allocations), under fake tensors as on the CPU, and a fake step costs one op.

@torch.library.custom_op("memsweep::adam32_update", mutates_args=("p", "state1", "state2"))
def adam32_update(p: torch.Tensor, grad: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor,
                  hyper: list[float], slice_elements: int) -> None:
    """AdamW on fp32 states (bitsandbytes' path for tensors under `min_8bit_size`)."""
    beta1, beta2, eps, bc1, bc2_sqrt, decay, lr = hyper
    pf, gf = _flat(p), _flat(grad)
    m_all, v_all = _flat(state1), _flat(state2)
    size = slice_elements
    for a in range(0, pf.numel(), size):
        g = gf[a:a + size]
        m, v = m_all[a:a + size], v_all[a:a + size]
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        u = v.sqrt().div_(bc2_sqrt).add_(eps)
        torch.div(m, u, out=u)
        _write_param(pf[a:a + size], u, decay, -lr / bc1)
        del u


@adam32_update.register_fake
def _(p, grad, state1, state2, hyper, slice_elements) -> None:
    return None


@torch.library.custom_op("memsweep::adam8bit_update",
                         mutates_args=("p", "state1", "state2", "absmax1", "absmax2"))
def adam8bit_update(p: torch.Tensor, grad: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor,
                    absmax1: torch.Tensor, absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor,
                    bounds1: torch.Tensor, bounds2: torch.Tensor, hyper: list[float], block: int,
                    slice_elements: int) -> None:
    """Block-wise 8-bit AdamW: dequantize a slice of m and v, update, requantize, write p."""
    beta1, beta2, eps, bc1, bc2_sqrt, decay, lr = hyper
    size = max(block, slice_elements // block * block)
    chunk = max(block, size // _SUBCHUNKS // block * block)
    pf, gf = _flat(p), _flat(grad)
    s1, s2 = _flat(state1), _flat(state2)
    for a in range(0, pf.numel(), size):
        g = gf[a:a + size]
        c1, c2 = s1[a:a + size], s2[a:a + size]
        blocks = slice(a // block, a // block + -(-c1.numel() // block))
        m = _dequantize(c1, absmax1[blocks], qmap1, block, chunk)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v = _dequantize(c2, absmax2[blocks], qmap2, block, chunk)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        _quantize_into(v, c2, absmax2[blocks], bounds2, False, block, chunk)
        v.sqrt_().div_(bc2_sqrt).add_(eps)  # v becomes the denominator ...
        torch.div(m, v, out=v)  # ... then m / denom (the bias correction of m is in the step size)
        _quantize_into(m, c1, absmax1[blocks], bounds1, True, block, chunk)
        del m
        _write_param(pf[a:a + size], v, decay, -lr / bc1)
        del v


@adam8bit_update.register_fake
def _(p, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, bounds1, bounds2, hyper, block,
      slice_elements) -> None:
    return None


@torch.library.custom_op("memsweep::lion_update", mutates_args=("p", "exp_avg"))
def lion_update(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, hyper: list[float],
                slice_elements: int) -> None:
    """Lion: p -= lr * sign(beta1 m + (1 - beta1) g); m = beta2 m + (1 - beta2) g."""
    beta1, beta2, decay, lr = hyper
    pf, gf, mf = _flat(p), _flat(grad), _flat(exp_avg)
    size = slice_elements
    for a in range(0, pf.numel(), size):
        g, m = gf[a:a + size], mf[a:a + size]
        c = m.to(torch.float32, copy=True).mul_(beta1).add_(g, alpha=1.0 - beta1).sign_()
        _write_param(pf[a:a + size], c, decay, -lr)
        del c
        m.mul_(beta2).add_(g, alpha=1.0 - beta2)


@lion_update.register_fake
def _(p, grad, exp_avg, hyper, slice_elements) -> None:
    return None


class AdamW8bit(Optimizer):
    """Block-wise 8-bit AdamW with bitsandbytes' state layout (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, block_size: int = 256,
                 min_8bit_size: int = 4096, paged: bool = False, slice_elements: int = 1 << 20):
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"invalid lr={lr}, eps={eps} or weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        if block_size < 1 or slice_elements < 1:
            raise ValueError("block_size and slice_elements must be positive")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.block_size = block_size
        self.min_8bit_size = min_8bit_size
        self.paged = paged
        self.slice_elements = slice_elements
        self._maps: dict[str, torch.Tensor] = {}

    def _code_maps(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The two code maps and their rounding bounds, made once (on the first 8-bit parameter's
        device) and shared, as bitsandbytes shares `name2qmap`."""
        if not self._maps or self._maps["qmap1"].device != device:
            for name, signed in (("1", True), ("2", False)):
                q = torch.tensor(dynamic_code(signed), dtype=torch.float32, device=device)
                self._maps["qmap" + name] = q
                self._maps["bounds" + name] = (q[1:] + q[:-1]) / 2
        return self._maps

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = 0
        n = p.numel()
        if n < self.min_8bit_size:
            state["state1"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["state2"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            return
        maps = self._code_maps(p.device)
        blocks = -(-n // self.block_size)
        state["state1"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
        state["qmap1"] = maps["qmap1"]
        state["state2"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
        state["qmap2"] = maps["qmap2"]
        state["absmax1"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)
        state["absmax2"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group, p in _with_grads(self):
            beta1, beta2 = group["betas"]
            state = self.state[p]
            if not state:
                self._init_state(p, state)
            state["step"] += 1
            t = state["step"]
            lr = group["lr"]
            hyper = dict(beta1=beta1, beta2=beta2, eps=group["eps"],
                         bc1=1.0 - beta1 ** t, bc2_sqrt=math.sqrt(1.0 - beta2 ** t),
                         decay=1.0 - lr * group["weight_decay"], lr=lr)
            if state["state1"].dtype == torch.uint8:
                self._step_8bit(p, state, **hyper)
            else:
                self._step_32bit(p, state, **hyper)
        return loss

    def _step_32bit(self, p, state, *, beta1, beta2, eps, bc1, bc2_sqrt, decay, lr) -> None:
        torch.ops.memsweep.adam32_update(p, p.grad, state["state1"], state["state2"],
                                         [beta1, beta2, eps, bc1, bc2_sqrt, decay, lr], self.slice_elements)

    def _step_8bit(self, p, state, *, beta1, beta2, eps, bc1, bc2_sqrt, decay, lr) -> None:
        maps = self._code_maps(p.device)
        torch.ops.memsweep.adam8bit_update(
            p, p.grad, state["state1"], state["state2"], state["absmax1"], state["absmax2"], state["qmap1"],
            state["qmap2"], maps["bounds1"], maps["bounds2"], [beta1, beta2, eps, bc1, bc2_sqrt, decay, lr],
            self.block_size, self.slice_elements)


class PagedAdamW8bit(AdamW8bit):
    """bitsandbytes' PagedAdamW8bit: the same state bytes; `paged` is recorded only."""

    def __init__(self, params, *args, **kwargs):
        kwargs["paged"] = True
        super().__init__(params, *args, **kwargs)


class Lion(Optimizer):
    """Lion (Chen et al. 2023); `exp_avg` in float32 (bitsandbytes) or the param dtype
    (lion-pytorch, `state_fp32=False`). See the module docstring."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, state_fp32: bool = True,
                 slice_elements: int = 1 << 20):
        if lr <= 0.0 or weight_decay < 0.0:
            raise ValueError(f"invalid lr={lr} or weight_decay={weight_decay}")
        if not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        if slice_elements < 1:
            raise ValueError("slice_elements must be positive")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        self.state_fp32 = state_fp32
        self.slice_elements = slice_elements

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group, p in _with_grads(self):
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            state = self.state[p]
            if not state:
                dtype = torch.float32 if self.state_fp32 else p.dtype
                state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            torch.ops.memsweep.lion_update(p, p.grad, state["exp_avg"],
                                           [beta1, beta2, 1.0 - lr * group["weight_decay"], lr], self.slice_elements)
        return loss


class Adafactor(Optimizer):
    """Adafactor as `transformers.optimization.Adafactor` (same arguments, state and per-step
    temporaries; see the module docstring)."""

    def __init__(self, params, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                 beta1=None, weight_decay=0.0, scale_parameter=True, relative_step=True,
                 warmup_init=False):
        if lr is not None and relative_step:
            raise ValueError("Cannot combine manual `lr` and `relative_step=True` options")
        if warmup_init and not relative_step:
            raise ValueError("`warmup_init=True` requires `relative_step=True`")
        super().__init__(params, dict(
            lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
            weight_decay=weight_decay, scale_parameter=scale_parameter,
            relative_step=relative_step, warmup_init=warmup_init))

    @staticmethod
    def _get_lr(group, state):
        """The step size: a float, or a 0-dim tensor when scaled by the parameter's RMS (HF takes
        a Python max over that tensor, which FakeTensorMode cannot evaluate)."""
        step_size = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * state["step"] if group["warmup_init"] else 1e-2
            step_size = min(min_step, 1.0 / math.sqrt(state["step"]))
        if group["scale_parameter"]:
            return state["RMS"].clamp(min=group["eps"][1]) * step_size
        return step_size

    @staticmethod
    def _rms(tensor):
        return tensor.norm(2) / (tensor.numel() ** 0.5)

    @staticmethod
    def _approx_sq_grad(exp_avg_sq_row, exp_avg_sq_col):
        row = exp_avg_sq_row / exp_avg_sq_row.mean(dim=-1, keepdim=True)
        r_factor = row.rsqrt_().unsqueeze(-1)
        c_factor = exp_avg_sq_col.unsqueeze(-2).rsqrt()
        return torch.mul(r_factor, c_factor)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        half = (torch.float16, torch.bfloat16)
        # The names below (grad, p_data_fp32, update) keep their tensors alive exactly as long
        # as HF's loop does, including `update` across parameters: do not `del` them.
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.dtype in half:
                    grad = grad.float()
                if grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients.")
                state = self.state[p]
                shape = grad.shape
                factored = len(shape) >= 2
                first_moment = group["beta1"] is not None
                if len(state) == 0:
                    state["step"] = 0
                    if first_moment:
                        state["exp_avg"] = torch.zeros_like(grad)
                    if factored:
                        state["exp_avg_sq_row"] = torch.zeros(shape[:-1]).to(grad)
                        state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:]).to(grad)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                    state["RMS"] = 0
                else:
                    for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
                        if key in state:
                            state[key] = state[key].to(grad)

                p_data_fp32 = p
                if p.dtype in half:
                    p_data_fp32 = p_data_fp32.float()

                state["step"] += 1
                state["RMS"] = self._rms(p_data_fp32)
                lr = self._get_lr(group, state)

                beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
                update = (grad ** 2) + group["eps"][0]
                if factored:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
                    col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
                    update = self._approx_sq_grad(row, col)
                    update.mul_(grad)
                else:
                    exp_avg_sq = state["exp_avg_sq"]
                    exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
                    update = exp_avg_sq.rsqrt().mul_(grad)

                update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
                update.mul_(lr)

                if first_moment:
                    exp_avg = state["exp_avg"]
                    exp_avg.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
                    update = exp_avg

                if group["weight_decay"] != 0:
                    if isinstance(lr, torch.Tensor):  # p - wd*lr*p, in place, as HF's add_
                        p_data_fp32.mul_(1.0 - group["weight_decay"] * lr)
                    else:
                        p_data_fp32.add_(p_data_fp32, alpha=-group["weight_decay"] * lr)

                p_data_fp32.add_(-update)

                if p.dtype in half:
                    p.copy_(p_data_fp32)
        return loss
