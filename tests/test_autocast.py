"""measure/autocast.py: steps traced on CPU tensors (fake and cpu backends) autocast as a GPU does.

`torch.autocast("cpu")` keeps softmax, pow, layer_norm, sum ... in the input's 16-bit dtype where
`torch.autocast("cuda")` computes them in fp32 (ATen's CUDA policy), which changes what autograd
saves; under `cuda_policy()` the CPU path follows the CUDA lists, and only while it is active."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from memsweep.measure.autocast import cuda_policy  # noqa: E402


def dtypes() -> dict[str, torch.dtype]:
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = x @ w  # bf16 (lower precision on both devices)
        return {
            "matmul": y.dtype,
            "softmax": F.softmax(y, dim=-1).dtype,
            "softmax(dtype=bf16)": F.softmax(y, dim=-1, dtype=torch.bfloat16).dtype,
            "log_softmax": F.log_softmax(y, dim=-1).dtype,
            "pow": torch.pow(y, 3.0).dtype,
            "exp": y.exp().dtype,
            "rsqrt": y.abs().rsqrt().dtype,
            "layer_norm": F.layer_norm(y, (8,)).dtype,
            "sum": y.sum().dtype,
            "einsum": torch.einsum("ij,jk->ik", x, w).dtype,
            "tanh": y.tanh().dtype,  # on neither list: the input's dtype
            "cross_entropy": F.cross_entropy(y, torch.zeros(4, dtype=torch.long)).dtype,
        }


def test_the_cpu_policy_keeps_16_bits_where_cuda_computes_in_fp32():
    native = dtypes()
    assert native["softmax"] == native["pow"] == native["layer_norm"] == torch.bfloat16


def test_under_cuda_policy_the_cpu_path_casts_like_cuda():
    before = dtypes()
    with cuda_policy():
        got = dtypes()
    fp32 = ("softmax", "log_softmax", "pow", "exp", "rsqrt", "layer_norm", "sum", "cross_entropy")
    assert {k: got[k] for k in fp32} == dict.fromkeys(fp32, torch.float32)
    assert got["matmul"] == got["einsum"] == got["tanh"] == torch.bfloat16
    assert got["softmax(dtype=bf16)"] == torch.bfloat16  # an explicit dtype is the caller's choice
    assert dtypes() == before  # and only while it is active


def test_autograd_saves_the_casts_as_on_a_gpu():
    """softmax of bf16 scores under the CUDA policy saves fp32 probabilities (4 bytes each)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved = []
    with cuda_policy(), FakeTensorMode():
        scores = torch.randn(2, 16, 16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                F.softmax(scores.to(torch.bfloat16), dim=-1).sum().backward()
    assert torch.float32 in saved and scores.grad.dtype == torch.float32


def test_a_recomputed_checkpoint_sees_the_same_policy():
    """Non-reentrant checkpointing re-runs the forward in the backward and checks that the
    recomputed tensors match the saved ones: the policy must hold there too."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    with cuda_policy():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = checkpoint(lambda a, b: F.softmax(a @ b, dim=-1).pow(2), x, w, use_reentrant=False)
        assert y.dtype == torch.float32
        y.sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
