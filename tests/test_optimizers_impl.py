"""memsweep.measure.optimizers: the reference AdamW8bit, Lion and Adafactor learn, keep the state
bytes the libraries keep, run under FakeTensorMode, and allocate the documented transient."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from memsweep.measure.optimizers import (  # noqa: E402
    Adafactor, AdamW8bit, Lion, PagedAdamW8bit, dynamic_code, optimizer_state_bytes)
from memsweep.measure.tracker import StorageTracker  # noqa: E402

MiB = 1 << 20
MAPS = 2 * 256 * 4  # AdamW8bit's two shared float32 code maps


def _regression(make_opt, shape=(64, 64), dtype=torch.float32, steps=50, seed=0):
    """Loss of a least-squares fit before and after `steps` steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, shape[0], generator=g)
    target = x @ torch.randn(shape, generator=g)
    w = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
    opt = make_opt([w])

    def loss_fn():
        return ((x @ w.float() - target) ** 2).mean()

    first = loss_fn().item()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
    return first, loss_fn().item(), opt


# --- behaviour ------------------------------------------------------------------------------

@pytest.mark.parametrize("make_opt", [
    pytest.param(lambda ps: AdamW8bit(ps, lr=0.05), id="adamw8bit"),
    # 4500 elements: a partial last block, several slices and sub-chunks
    pytest.param(lambda ps: AdamW8bit(ps, lr=0.05, block_size=64, slice_elements=1000), id="adamw8bit-sliced"),
    pytest.param(lambda ps: AdamW8bit(ps, lr=0.05, min_8bit_size=1 << 30), id="adamw8bit-fp32-state"),
    pytest.param(lambda ps: PagedAdamW8bit(ps, lr=0.05), id="paged"),
    pytest.param(lambda ps: Lion(ps, lr=0.02, slice_elements=1000), id="lion"),
    pytest.param(lambda ps: Lion(ps, lr=0.02, state_fp32=False), id="lion-param-dtype"),
    pytest.param(lambda ps: Adafactor(ps), id="adafactor"),
    pytest.param(lambda ps: Adafactor(ps, lr=0.05, relative_step=False, scale_parameter=False,
                                      beta1=0.9, weight_decay=0.01), id="adafactor-beta1"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reduces_loss(make_opt, dtype):
    first, last, opt = _regression(make_opt, shape=(50, 90), dtype=dtype)
    assert math.isfinite(last) and last < 0.6 * first, (first, last)


def test_fp32_state_path_matches_torch_adamw():
    """Below min_8bit_size the update is plain AdamW (bitsandbytes' 32-bit kernel)."""
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    _, ours, _ = _regression(lambda ps: AdamW8bit(ps, min_8bit_size=1 << 30, slice_elements=700, **kw))
    _, ref, _ = _regression(lambda ps: torch.optim.AdamW(ps, **kw))
    assert ours == pytest.approx(ref, rel=1e-4)


def test_8bit_tracks_torch_adamw():
    kw = dict(lr=0.01, weight_decay=0.0)
    _, ours, _ = _regression(lambda ps: AdamW8bit(ps, **kw), steps=30)
    _, ref, _ = _regression(lambda ps: torch.optim.AdamW(ps, **kw), steps=30)
    assert ours == pytest.approx(ref, rel=0.1)


def test_dynamic_code_round_trips():
    for signed in (True, False):
        code = dynamic_code(signed)
        assert len(code) == 256 == len(set(code)) and code == sorted(code)
        assert code[-1] == 1.0 and 0.0 in code and (min(code) < -0.99 if signed else min(code) == 0.0)
    opt = AdamW8bit([torch.nn.Parameter(torch.zeros(4096))])
    x = torch.randn(4096) * torch.logspace(-3, 0, 4096)
    p = opt.param_groups[0]["params"][0]
    opt.step()  # no grad: nothing happens, no state
    assert not opt.state
    p.grad = x.clone()
    opt.step()
    st = opt.state[p]
    m = st["qmap1"][st["state1"].long()].view(-1, 256) * st["absmax1"][:, None]
    assert torch.allclose(m.view(-1), 0.1 * x, rtol=0.1, atol=2e-3 * 0.1 * x.abs().max().item())


def test_lion_matches_its_definition():
    torch.manual_seed(0)
    p0, g1, g2 = torch.randn(3000), torch.randn(3000), torch.randn(3000)
    p = torch.nn.Parameter(p0.clone())
    opt = Lion([p], lr=0.1, betas=(0.8, 0.95), weight_decay=0.5, slice_elements=512)
    ref, m = p0.clone(), torch.zeros(3000)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        ref = ref * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.8 * m + 0.2 * g)
        m = 0.95 * m + 0.05 * g
    assert torch.allclose(p.detach(), ref, atol=1e-6)
    assert torch.allclose(opt.state[p]["exp_avg"], m, atol=1e-6)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(lr=0.01, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.1),
    dict(scale_parameter=True, relative_step=True, warmup_init=True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adafactor_matches_transformers(kw, dtype):
    transformers = pytest.importorskip("transformers.optimization")
    torch.manual_seed(0)
    shapes = [(6, 5), (7,), (2, 3, 4)]
    init = [torch.randn(s).to(dtype) for s in shapes]
    grads = [[torch.randn(s).to(dtype) for s in shapes] for _ in range(3)]
    result = []
    for cls in (Adafactor, transformers.Adafactor):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = cls(ps, **kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        result.append((ps, opt))
    (ours, o1), (ref, o2) = result
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, ref):
        sa, sb = o1.state[a], o2.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert sa[k].dtype == sb[k].dtype == torch.float32 and sa[k].shape == sb[k].shape
    assert optimizer_state_bytes(o1) == optimizer_state_bytes(o2)


# --- state bytes ----------------------------------------------------------------------------

def _stepped(opt_cls, shapes, dtype=torch.float32, **kw):
    ps = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    opt = opt_cls(ps, **kw)
    for p in ps:
        p.grad = torch.randn_like(p)
    assert optimizer_state_bytes(opt) == 0  # state is made at the first step
    opt.step()
    return ps, opt


def _bytes(state):
    return sum(v.untyped_storage().nbytes() for k, v in state.items()
               if isinstance(v, torch.Tensor) and not k.startswith("qmap"))


def test_adamw8bit_state_bytes():
    big, small = 300 * 301, 4095  # 90300: not a multiple of 256
    (pb, ps), opt = _stepped(AdamW8bit, [(300, 301), (4095,)])
    sb, ss = opt.state[pb], opt.state[ps]
    assert sb["state1"].dtype == sb["state2"].dtype == torch.uint8
    assert sb["absmax1"].shape == sb["absmax2"].shape == (math.ceil(big / 256),)
    assert _bytes(sb) == 2 * big + 8 * math.ceil(big / 256)
    assert ss["state1"].dtype == torch.float32 and _bytes(ss) == 8 * small
    assert sb["qmap1"] is ss.get("qmap1", sb["qmap1"])
    assert optimizer_state_bytes(opt) == 2 * big + 8 * math.ceil(big / 256) + 8 * small + MAPS
    (p,), opt = _stepped(AdamW8bit, [(300, 301)], block_size=2048)  # bitsandbytes <= 0.43
    assert _bytes(opt.state[p]) == 2 * big + 8 * math.ceil(big / 2048)
    assert PagedAdamW8bit([p]).paged and not opt.paged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lion_state_bytes(dtype):
    (p,), opt = _stepped(Lion, [(33, 65)], dtype)
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert optimizer_state_bytes(opt) == 4 * p.numel()
    (p,), opt = _stepped(Lion, [(33, 65)], dtype, state_fp32=False)
    assert optimizer_state_bytes(opt) == p.element_size() * p.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adafactor_state_bytes(dtype):
    rows, cols, n = 33, 65, 100
    rms = 4  # HF keeps state["RMS"], a 0-dim float32 tensor
    (m, v), opt = _stepped(Adafactor, [(rows, cols), (n,)], dtype)
    assert opt.state[m]["exp_avg_sq_row"].dtype == torch.float32
    assert _bytes(opt.state[m]) == (rows + cols) * 4 + rms
    assert _bytes(opt.state[v]) == 4 * n + rms
    (m, v), opt = _stepped(Adafactor, [(rows, cols), (n,)], dtype, beta1=0.9, lr=0.1,
                           relative_step=False)
    assert _bytes(opt.state[m]) == (rows + cols) * 4 + 4 * rows * cols + rms
    assert _bytes(opt.state[v]) == 8 * n + rms
    (t,), opt = _stepped(Adafactor, [(3, 5, 7)], dtype)
    assert opt.state[t]["exp_avg_sq_row"].shape == (3, 5)
    assert opt.state[t]["exp_avg_sq_col"].shape == (3, 7)


# --- FakeTensorMode and the step's transient ------------------------------------------------

def _fake_step_transient(make_opt, shapes, dtype, steps=2):
    """Under FakeTensorMode and a StorageTracker: (state bytes, transient of the last step above
    what was alive before it: params + grads + optimizer state)."""
    with FakeTensorMode(), StorageTracker() as tracker:
        with tracker.section("setup", "weights"):
            ps = [torch.nn.Parameter(torch.empty(s, dtype=dtype)) for s in shapes]
        with tracker.section("setup", "gradients"):
            for p in ps:
                p.grad = torch.empty_like(p)
        opt = make_opt(ps)
        for i in range(steps):
            before = tracker.current.total
            tracker.reset_peak()
            with tracker.section("optimizer", "optimizer"):
                opt.step()
            transient = tracker.peak.total - before
            kept = tracker.current.total - before  # the state, made at the first step
            # (+ AdamW8bit's rounding bounds of its code maps: 2 x 255 floats, kept on the optimizer)
            assert kept == 0 if i else 0 <= kept - optimizer_state_bytes(opt) <= 2040
        return optimizer_state_bytes(opt), transient


BIG = (2048, 4096)
N = BIG[0] * BIG[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_adamw8bit_step_allocates_nothing_beyond_its_states(dtype):
    """bitsandbytes' update is one fused kernel: so is memsweep::adam8bit_update, whose slices'
    fp32 temporaries a traced step does not see (as a CUDA kernel's registers)."""
    state, transient = _fake_step_transient(lambda ps: AdamW8bit(ps), [BIG], dtype)
    assert state == 2 * N + 8 * (N // 256) + MAPS
    assert transient == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("state_fp32", [True, False])
def test_lion_step_allocates_nothing_beyond_its_state(dtype, state_fp32):
    state, transient = _fake_step_transient(lambda ps: Lion(ps, state_fp32=state_fp32), [BIG], dtype)
    assert state == N * (4 if state_fp32 else torch.empty((), dtype=dtype).element_size())
    assert transient == 0


@pytest.mark.parametrize("dtype,temps", [(torch.bfloat16, 4), (torch.float32, 2)], ids=["bf16", "fp32"])
def test_adafactor_transient(dtype, temps):
    """HF's peak: `temps` float32 copies of the parameter (see the module docstring), plus the
    row/col means and factors (4 * (rows + cols) B) and 0-dim scalars."""
    rows, cols = BIG
    small = 4 * (rows + cols) + 4
    state, transient = _fake_step_transient(lambda ps: Adafactor(ps), [BIG], dtype)
    assert state == 4 * (rows + cols) + 4
    assert transient == temps * 4 * N + small, (transient - temps * 4 * N)
    # with beta1 the peak is the same (reached before exp_avg takes over the update)
    _, t1 = _fake_step_transient(lambda ps: Adafactor(ps, beta1=0.9, lr=1e-3, relative_step=False), [BIG], dtype)
    assert temps * 4 * N <= t1 <= temps * 4 * N + small
    # two parameters: the first one's `update` is still alive at the second's peak (beta1=None)
    _, t2 = _fake_step_transient(lambda ps: Adafactor(ps), [BIG, BIG], dtype)
    # (at the second one's `grad**2 + eps`, where no row/col factor is alive: + the 0-dim lr)
    assert t2 == (temps + 1) * 4 * N + 4, (t2 - (temps + 1) * 4 * N)
    _, t3 = _fake_step_transient(lambda ps: Adafactor(ps, beta1=0.9, lr=1e-3, relative_step=False),
                                 [BIG, BIG], dtype)
    assert t3 == t1


@pytest.mark.parametrize("kw", [
    dict(), dict(beta1=0.9, lr=1e-3, relative_step=False),
    dict(beta1=0.9, lr=1e-3, relative_step=False, scale_parameter=False, weight_decay=0.1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_adafactor_transient_equals_transformers_on_cpu(kw, dtype):
    """Real CPU tensors under the tracker: the same peak as transformers.Adafactor, to the byte."""
    transformers = pytest.importorskip("transformers.optimization")

    def transient(cls, shapes):
        with StorageTracker() as tracker:
            ps = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
            for p in ps:
                p.grad = torch.randn_like(p)
            opt = cls(ps, **kw)
            opt.step()
            before = tracker.current.total
            tracker.reset_peak()
            opt.step()
            return tracker.peak.total - before

    for shapes in ([(64, 128)], [(64, 128), (64, 128)], [(300,), (32, 64), (4, 8, 16)]):
        assert transient(Adafactor, shapes) == transient(transformers.Adafactor, shapes), shapes


def test_all_run_under_fake_tensor_mode_with_odd_shapes():
    for make in (lambda ps: AdamW8bit(ps, block_size=64, slice_elements=3000),
                 lambda ps: Lion(ps, slice_elements=777, weight_decay=0.1),
                 lambda ps: Adafactor(ps, beta1=0.9, weight_decay=0.1)):
        state, _ = _fake_step_transient(make, [(97, 101), (5000,), (3, 50, 70), (7,)], torch.float16)
        assert state > 0
