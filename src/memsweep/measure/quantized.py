"""Quantized frozen linears for the reference models: QLoRA's NF4 / FP4 base, LLM.int8(), GPTQ / AWQ.

Each block matrix keeps the tensors its library stores (formulas/techniques.py cites the layouts),
so a traced step holds exactly those bytes:

- nf4 / fp4 (bitsandbytes `Params4bit`): the packed values, ceil(n / 2) uint8; one absmax per block
  of `group` elements, fp32, or with double quantization uint8 per block plus one fp32 constant per
  256 blocks;
- int8 (bitsandbytes `Int8Params`): int8 (d_out, d_in) and an fp32 scale per output row (`SCB`);
- gptq: `qweight` int32 (d_in / 8, d_out), `qzeros` int32 (d_in / g, d_out / 8), `scales` fp16
  (d_in / g, d_out), `g_idx` int32 (d_in); awq: `qweight` int32 (d_in, d_out / 8), the same zeros
  and scales, no `g_idx`.

The matmul dequantizes the whole weight to the compute dtype, uses it, and drops it, in the forward
and again in the backward (bitsandbytes' `MatMul4Bit` since 0.43.2 saves only the packed weight,
`ctx.tensors = (None, B)`, not the input). The dequantization writes into one preallocated
(d_out, d_in) tensor in row slices, as the libraries' kernels
allocate only the output: it is one custom op (`memsweep::dequantize`), so a traced step sees its
output alone, under fake tensors as on the CPU. Values are a faithful decode of the stored codes
(NF4's table, the int8 scales), so a CPU run computes something sensible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SLICE_ELEMENTS = 1 << 20
DOUBLE_QUANT_BLOCK = 256
# The 16 NormalFloat-4 levels (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 code)
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)
METHODS = ("nf4", "fp4", "int8", "gptq", "awq")


BUFFERS = {"int8": ("qweight", "scb"), "gptq": ("qweight", "qzeros", "scales", "g_idx"),
           "awq": ("qweight", "qzeros", "scales")}


@torch.library.custom_op("memsweep::dequantize", mutates_args=())
def dequantize(buffers: list[Tensor], method: str, d_out: int, d_in: int, group: int, double_quant: bool,
               dtype: torch.dtype) -> Tensor:
    """Decode a stored matrix into a new (d_out, d_in) tensor of `dtype`, row slice by row slice.
    A traced step sees this one op and its output (the libraries' kernels allocate nothing else)."""
    w = torch.empty(d_out, d_in, dtype=dtype, device=buffers[0].device)
    rows = max(1, SLICE_ELEMENTS // d_in)
    for r0 in range(0, d_out, rows):
        r1 = min(d_out, r0 + rows)
        w[r0:r1] = _rows(buffers, method, d_in, group, double_quant, r0, r1).to(dtype)
    return w


@dequantize.register_fake
def _(buffers, method, d_out, d_in, group, double_quant, dtype):
    return buffers[0].new_empty((d_out, d_in), dtype=dtype)


def _rows(buffers: list[Tensor], method: str, d_in: int, group: int, double_quant: bool, r0: int, r1: int) -> Tensor:
    """Rows r0..r1 of the weight, decoded in fp32."""
    if method == "int8":
        qweight, scb = buffers
        return qweight[r0:r1] * (scb[r0:r1, None] / 127.0)
    if method in ("nf4", "fp4"):
        packed, *scales, code = buffers
        e0, e1 = r0 * d_in, r1 * d_in  # flat element range (even: d_in is)
        codes = packed[e0 // 2:(e1 + 1) // 2]
        idx = torch.stack(((codes >> 4), (codes & 15)), dim=-1).flatten()[:e1 - e0].int()
        b0, b1 = e0 // group, -(-e1 // group)
        if double_quant:
            absmax_q, absmax_scale = scales
            absmax = absmax_q[b0:b1].float() * absmax_scale.repeat_interleave(DOUBLE_QUANT_BLOCK)[b0:b1]
        else:
            absmax = scales[0][b0:b1]
        absmax = absmax.repeat_interleave(group)[e0 - b0 * group:e1 - b0 * group]
        return (code[idx] * absmax).view(r1 - r0, d_in)
    # gptq / awq: 4-bit values unpacked from int32 words, (q - zero) * scale per group
    qweight, _, scales, *g_idx = buffers
    cols = torch.arange(d_in, device=qweight.device, dtype=torch.int32)
    if method == "gptq":
        words = qweight[cols // 8, r0:r1].t()  # (rows, d_in)
        q = (words >> ((cols % 8) * 4)) & 15
        grp = g_idx[0]
    else:
        out = torch.arange(r0, r1, device=qweight.device, dtype=torch.int32)
        words = qweight[:, out // 8].t()  # (rows, d_in)
        q = (words >> ((out % 8) * 4)[:, None]) & 15
        grp = cols // group
    return ((q - 8) * scales[:, r0:r1][grp].t()).float()


class QuantizedMatmul(torch.autograd.Function):
    """y = x W^T with W dequantized in the forward and again in the backward; saves no input."""

    @staticmethod
    def forward(ctx, x: Tensor, module: QuantLinear) -> Tensor:
        ctx.module = module
        w = module.dequantize(x.dtype)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w = ctx.module.dequantize(grad.dtype)
        return grad @ w, None


class QuantLinear(nn.Module):
    """A frozen linear whose weight is stored quantized (the storage of module docstring)."""

    def __init__(self, d_in: int, d_out: int, bias: Tensor | None, method: str, group: int,
                 double_quant: bool, device, compute_dtype: torch.dtype) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method={method!r}: expected one of {METHODS}")
        self.in_features, self.out_features = d_in, d_out
        self.method, self.group, self.double_quant = method, group, double_quant
        self.compute_dtype = compute_dtype
        self.bias = bias
        n = d_in * d_out
        u8 = {"dtype": torch.uint8, "device": device}
        if method in ("nf4", "fp4"):
            self.register_buffer("packed", torch.randint(0, 256, (math.ceil(n / 2),), **u8))
            blocks = math.ceil(n / group)
            if double_quant:
                self.register_buffer("absmax_q", torch.randint(0, 256, (blocks,), **u8))
                self.register_buffer("absmax_scale", torch.full((math.ceil(blocks / DOUBLE_QUANT_BLOCK),), 0.02 / 255,
                                                                dtype=torch.float32, device=device))
            else:
                self.register_buffer("absmax", torch.full((blocks,), 0.02, dtype=torch.float32, device=device))
            self.register_buffer("code", torch.tensor(NF4, dtype=torch.float32, device=device))
        elif method == "int8":
            self.register_buffer("qweight", torch.randint(-127, 128, (d_out, d_in), dtype=torch.int8, device=device))
            self.register_buffer("scb", torch.full((d_out,), 0.02 * 127, dtype=torch.float32, device=device))
        else:
            i32 = {"dtype": torch.int32, "device": device}
            groups = math.ceil(d_in / group)
            shape = (math.ceil(d_in / 8), d_out) if method == "gptq" else (d_in, math.ceil(d_out / 8))
            self.register_buffer("qweight", torch.randint(0, 2**31 - 1, shape, **i32))
            self.register_buffer("qzeros", torch.randint(0, 2**31 - 1, (groups, math.ceil(d_out / 8)), **i32))
            self.register_buffer("scales", torch.full((groups, d_out), 0.02 / 8, dtype=torch.float16, device=device))
            if method == "gptq":
                self.register_buffer("g_idx", torch.arange(d_in, **i32) // group)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The (d_out, d_in) weight in `dtype`: one op whose only allocation is its output, as the
        libraries' dequantization kernels (`memsweep::dequantize`, decoded in row slices inside)."""
        names = BUFFERS[self.method] if self.method not in ("nf4", "fp4") else (
            ("packed", "absmax_q", "absmax_scale", "code") if self.double_quant else ("packed", "absmax", "code"))
        return torch.ops.memsweep.dequantize([getattr(self, n) for n in names], self.method, self.out_features,
                                             self.in_features, self.group, self.double_quant, dtype)

    def forward(self, x: Tensor) -> Tensor:
        # as bitsandbytes' Linear4bit / Linear8bitLt: the input cast to the compute dtype, the bias
        # too, the output back to the input's dtype (fp32 hidden states after peft's
        # prepare_model_for_kbit_training; a no-op when the two dtypes agree)
        dtype = x.dtype
        y = QuantizedMatmul.apply(x.to(self.compute_dtype), self)
        y = y if self.bias is None else y + self.bias.to(self.compute_dtype)
        return y.to(dtype)


class QuantLoRALinear(QuantLinear):
    """A quantized base with a LoRA adapter (QLoRA): the adapter as `models.LoRALinear` runs it."""

    def attach(self, lora_a: nn.Parameter, lora_b: nn.Parameter, scale: float) -> None:
        self.lora_a, self.lora_b, self.scale = lora_a, lora_b, scale

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b)
        return super().forward(x) + update * self.scale


def quantize_blocks(model: nn.Module, method: str, group: int, double_quant: bool) -> int:
    """Replace every linear of the model's blocks (not embeddings, lm_head, routers) by its
    quantized storage; LoRA adapters stay. Returns the number of matrices quantized."""
    from memsweep.measure.models import LoRALinear

    count = 0
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] in ("router", "shared_gate"):
                continue
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            child = name.rsplit(".", 1)[-1]
            w = module.weight
            bias = module.bias
            lora = isinstance(module, LoRALinear)
            cls = QuantLoRALinear if lora else QuantLinear
            q = cls(module.in_features, module.out_features, bias, method, group, double_quant, w.device, w.dtype)
            if lora:
                q.attach(module.lora_a, module.lora_b, module.scale)
            setattr(parent, child, q)
            count += 1
    return count
