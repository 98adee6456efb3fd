"""CUDA's autocast cast policy for steps traced on CPU tensors (`measure=fake`, `measure=cpu`).

Fake measurements run on the CPU device (FakeTensorMode cannot run a backward on fake CUDA
tensors with a CPU-only torch), and `torch.autocast("cpu")` casts by a different list than
`torch.autocast("cuda")`, the one a GPU user runs: on CUDA `softmax`, `log_softmax`, `sum`,
`cumsum` compute in fp32, `pow`, `exp`, `rsqrt`, `layer_norm` cast their inputs to fp32, and
`einsum`, `mv`, `addmv` run in the low precision; on CPU they all keep their input dtype. The
difference decides which copies autograd saves: an eager softmax of bf16 scores saves fp32
probabilities on a GPU and bf16 ones on a CPU, GPT-2's `gelu_new` (`x ** 3`) saves an fp32 cube.

While `cuda_policy()` is active (around the whole measured run: forward, backward and any
recomputation a checkpoint does), `torch.autocast("cpu")` uses the CPU kernels of those operators
replaced by ones following the CUDA policy: a Python kernel on the
`AutocastCPU` dispatch key casts the eligible arguments and redispatches below autocast, as
ATen's own autocast wrappers do, so autograd records (and saves) the casts exactly as on a GPU.

The lists are ATen's CUDA policy (torch 2.13, aten/src/ATen/autocast_mode.h and .cpp:
lower_precision_fp, fp32, fp32_set_opt_dtype); `cross_entropy_loss`, which the CPU policy
casts to fp32 as a whole but CUDA decomposes (log_softmax in fp32 + nll_loss), is decomposed.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

# CUDA's lists where the CPU one differs (operators both policies treat alike are left alone).
LOWER_PRECISION = ("addmv", "addr", "einsum", "mv", "chain_matmul", "linalg_multi_dot")
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
    "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus",
    "layer_norm", "native_layer_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm",
    "cosine_similarity", "dist", "pdist", "renorm", "logsumexp",
)
FP32_SET_OPT_DTYPE = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum",
    "linalg_vector_norm", "linalg_matrix_norm", "sum", "sum.dim_IntList",
)
DECOMPOSED = ("cross_entropy_loss",)

_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _op(name: str) -> torch._ops.OpOverload:
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _eligible(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64


def _cast(x, dtype: torch.dtype):
    if _eligible(x):
        return x.to(dtype)
    if isinstance(x, (list, tuple)) and any(_eligible(t) for t in x):
        return type(x)(_cast(t, dtype) for t in x)
    return x


def _casting(op: torch._ops.OpOverload, dtype_of) -> object:
    def kernel(*args, **kwargs):
        dtype = dtype_of()
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            return op(*(_cast(a, dtype) for a in args), **{k: _cast(v, dtype) for k, v in kwargs.items()})
    return kernel


def _fp32_dtype_arg(op: torch._ops.OpOverload) -> object:
    """fp32_set_opt_dtype: compute in fp32 (the `dtype=` argument) unless the caller named one."""
    names = [a.name for a in op._schema.arguments]
    at = names.index("dtype")

    def kernel(*args, **kwargs):
        args = list(args)
        given = args[at] if at < len(args) else kwargs.get("dtype")
        if given is None and _eligible(args[0]):
            if at < len(args):
                args[at] = torch.float32
            else:
                kwargs["dtype"] = torch.float32
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            return op(*args, **kwargs)
    return kernel


@contextlib.contextmanager
def cuda_policy() -> Iterator[None]:
    """While active, CPU autocast casts as CUDA autocast does (module docstring)."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name in LOWER_PRECISION:
                lib.impl(name, _casting(_op(name), lambda: torch.get_autocast_dtype("cpu")), "AutocastCPU")
            for name in FP32:
                lib.impl(name, _casting(_op(name), lambda: torch.float32), "AutocastCPU")
            for name in FP32_SET_OPT_DTYPE:
                lib.impl(name, _fp32_dtype_arg(_op(name)), "AutocastCPU")
            for name in DECOMPOSED:
                lib.impl(name, _op(name).decompose, "AutocastCPU")
        yield
    finally:
        lib._destroy()
