"""SDPA's kernel choice on a GPU, as torch makes it (no torch needed: `detailed` reads it too).

`choose(Call, capability)` follows aten/src/ATen/native/transformers/cuda/sdp_utils.cpp and
sdp_utils_cpp.h for dense 4-D inputs: the priority order (`check_prefer_cudnn_attention`: cuDNN
first on sm90 / sm100, else flash, memory-efficient, math) and each kernel's constraints
(`can_use_{cudnn,flash,mem_efficient}_attention`: dtypes, head sizes, masks, dropout, GQA, causal
with T != S, alignment). `measure/sdpa.py` runs the chosen kernel in fake measurements;
`formulas/detailed.py` (`sdpa_kernel`) picks it for its rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KERNELS = ("cudnn", "flash", "efficient", "math")
"""Every kernel `choose` returns, in the order the index columns use."""

CUDNN_VERSION = 91701
"""The cuDNN runtime assumed with torch 2.13's CUDA wheels (9.17.1; sdp_utils.cpp prefers cuDNN
attention on sm90 / sm100 from 9.15.1 on, `check_prefer_cudnn_attention`, pytorch #169849). It
decides the head sizes cuDNN takes: 128, or 192 / 128 (DeepSeek's MLA) on sm90 / sm100
(>= 9.11); 256 needs > 9.22."""

HALF = ("float16", "bfloat16")


@dataclass(frozen=True)
class Call:
    """What SDPA's kernel choice reads from one call (dense 4-D inputs)."""

    dtype: str  # "float16" | "bfloat16" | "float32" (query's; k and v share it)
    batch: int
    heads: int  # query heads
    kv_heads: int
    t: int  # query tokens
    s: int  # key tokens
    d_qk: int
    d_v: int
    mask: str = "none"  # "none" | "ok" (a 2-D or (B|1, H|1, T, S) mask) | "other" (another shape)
    dropout: float = 0.0
    is_causal: bool = False
    enable_gqa: bool = False
    requires_grad: bool = False
    offsets: int = 0  # gcd of q, k, v storage offsets (elements): memory-efficient's alignment check
    stride1: bool = True  # q, k, v have a last-dimension stride of 1


def _at_least(cap: tuple[int, int], lo: tuple[int, int], hi: tuple[int, int] = (12, 1)) -> bool:
    return lo <= cap <= hi


def prefers_cudnn(cap: tuple[int, int]) -> bool:
    """`check_prefer_cudnn_attention`: sm90 / sm100 (minor 0 or 3 with CUDA < 13 wheels)."""
    return CUDNN_VERSION > 91500 and cap[0] in (9, 10) and cap[1] in (0, 3)


def _heads_ok(c: Call, gqa: bool) -> bool:
    if c.enable_gqa and gqa:
        return c.heads % c.kv_heads == 0
    return c.heads == c.kv_heads


def flash_ok(c: Call, cap: tuple[int, int]) -> bool:
    if c.mask != "none" or c.dtype not in HALF or not _at_least(cap, (8, 0)):
        return False
    if not (c.d_qk == c.d_v <= 256):
        return False
    if c.requires_grad and ((8, 6) <= cap <= (8, 9) or (12, 0) <= cap <= (12, 1)):
        if not (c.d_qk <= 192 or (c.dropout == 0.0 and c.d_qk > 224)):
            return False
    if c.is_causal and c.t != c.s:
        return False
    return _heads_ok(c, gqa=True) and c.t > 0 and c.s > 0


def efficient_ok(c: Call, cap: tuple[int, int]) -> bool:
    if not _at_least(cap, (5, 0)):
        return False
    half = c.dtype in HALF
    if not (half or c.dtype == "float32") or (c.dtype == "bfloat16" and cap < (8, 0)):
        return False
    # minimum_gemm_alignment: tensor cores from sm80 (sm70 for half), 128 bits per access
    align = 4 if cap >= (8, 0) else 1
    if cap >= (8, 0) or (cap >= (7, 0) and half):
        align = max(align, 128 // (16 if half else 32))
    if c.d_qk % align or c.d_v % align or not c.stride1:
        return False
    if cap >= (8, 0) and c.offsets % align:  # check_data_ptr_alignment_mem_efficient
        return False
    # torch 2.13's memory-efficient kernel takes equal head counts only (its meta kernel and the
    # `enable_gqa` documentation: GQA "works only for Flash_attention and math kernel on CUDA")
    return c.heads == c.kv_heads and c.t > 0 and c.s > 0 and c.mask != "other"


def cudnn_ok(c: Call, cap: tuple[int, int]) -> bool:
    if c.dtype not in HALF or c.mask == "other" or not _at_least(cap, (8, 0)):
        return False
    if c.dropout * 16.0 != math.floor(c.dropout * 16.0):
        return False
    if not _heads_ok(c, gqa=True) or c.batch > 65535 or c.heads > 65535:
        return False
    sm90 = (cap[0] == 9 and cap[1] == 0) or cap[0] == 10
    limit = 256 if (sm90 and CUDNN_VERSION > 92200) else (
        192 if (sm90 and CUDNN_VERSION >= 91100 and (c.d_qk, c.d_v) == (192, 128)) else 128)
    if c.d_qk > limit or c.d_v > limit or c.d_qk % 8 or c.d_v % 8:
        return False
    if c.s == 1 or (c.dropout > 0.0 and c.t == 1):
        return False
    return c.t > 0


def choose(c: Call, cap: tuple[int, int]) -> str:
    """The kernel `select_sdp_backend` returns for this call on a GPU of compute capability `cap`."""
    order = ("cudnn", "flash", "efficient", "math") if prefers_cudnn(cap) else ("flash", "efficient", "math")
    ok = {"cudnn": cudnn_ok, "flash": flash_ok, "efficient": efficient_ok}
    for kernel in order:
        if kernel == "math" or ok[kernel](c, cap):
            return kernel
    return "math"
