"""Issue 30: fused kernels and torch.compile (`kernels`). The fused Functions compute what the
eager ops compute (float64 gradients), save what their sources save (the trace), `detailed` follows
the trace phase by phase, and the config refuses what is not modelled in one line."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import job, model

from memsweep.columns import Columns
from memsweep.errors import ConfigError
from memsweep.estimate import estimate_rows
from memsweep.formulas import FORMULAS
from memsweep.formulas.detailed import phase_peaks
from memsweep.specs import KernelsSpec, LossSpec, MeasureSpec

torch = pytest.importorskip("torch")
F = torch.nn.functional

FAKE = MeasureSpec("fake", "fake")
LIGER = KernelsSpec("liger", norm="fused", mlp="fused", rope="fused", loss="fused_linear")
FLASH = KernelsSpec("flash_attn", norm="fused", mlp="fused", rope="fused", loss="fused")
COMPILE = KernelsSpec("compile", compile=True)


def small(name: str, layers: int = 2):
    m = model(name)
    return dataclasses.replace(m, layers=layers)


# --- the Functions compute what the eager ops compute --------------------------------------------------

def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out) if out.dim() else torch.ones(())
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in inputs if t.requires_grad]


def _same(a, b):
    out_a, g_a = a
    out_b, g_b = b
    assert torch.allclose(out_a, out_b, atol=1e-10, rtol=1e-9)
    for x, y in zip(g_a, g_b, strict=True):
        assert torch.allclose(x, y, atol=1e-10, rtol=1e-9)


def test_the_fused_functions_compute_the_eager_values_and_gradients():
    from memsweep.measure import kernels as K
    from memsweep.measure.models import apply_rope, rope_cos_sin

    g = torch.Generator().manual_seed(0)
    d = torch.float64
    x = torch.randn(2, 5, 8, dtype=d, generator=g, requires_grad=True)
    w = torch.randn(8, dtype=d, generator=g, requires_grad=True)
    b = torch.randn(8, dtype=d, generator=g, requires_grad=True)

    def eager_rms(x, w):  # LlamaRMSNorm's arithmetic (in fp64 here)
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    _same(_grads(lambda x, w: K.FusedRMSNorm.apply(x, w, 1e-5), x, w), _grads(eager_rms, x, w))
    _same(_grads(lambda x, w, b: K.FusedLayerNorm.apply(x, w, b, 1e-5), x, w, b),
          _grads(lambda x, w, b: F.layer_norm(x, (8,), w, b, 1e-5), x, w, b))
    a, u = (torch.randn(2, 5, 16, dtype=d, generator=g, requires_grad=True) for _ in range(2))
    _same(_grads(lambda a, u: K.fused_gated(a, u, True), a, u), _grads(lambda a, u: F.silu(a) * u, a, u))
    _same(_grads(lambda a, u: K.fused_gated(a, u, False), a, u),
          _grads(lambda a, u: F.gelu(a, approximate="tanh") * u, a, u))
    # rotary, whole heads and GPT-NeoX's partial rotary; q as the projection's transposed view
    for rot in (8, 4):
        cos, sin = rope_cos_sin(0, 5, rot, d, "cpu")
        q = torch.randn(2, 5, 3 * 8, dtype=d, generator=g, requires_grad=True)

        def heads(q):
            return (q * 1.0).view(2, 5, 3, 8).transpose(1, 2)  # (B, nh, T, hs), a view of a fresh tensor

        _same(_grads(lambda q: K.fused_rope(heads(q), cos, sin), q), _grads(lambda q: apply_rope(heads(q), cos, sin), q))
    logits = torch.randn(10, 7, dtype=d, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (10,), generator=g)
    _same(_grads(lambda z: K.fused_cross_entropy(z * 1.0, targets), logits),
          _grads(lambda z: F.cross_entropy(z, targets), logits))
    h = torch.randn(10, 8, dtype=d, generator=g, requires_grad=True)
    head = torch.randn(7, 8, dtype=d, generator=g, requires_grad=True)
    for chunk in (3, 16):  # several chunks (the last one short), and one
        _same(_grads(lambda h, W: K.fused_linear_cross_entropy(h, W, targets, chunk), h, head),
              _grads(lambda h, W: F.cross_entropy(h @ W.t(), targets), h, head))


def test_one_kernel_counts_its_outputs_not_its_temporaries():
    """A fused RMSNorm over (n, h) fp32 allocates its output and one fp32 statistic per row; the
    op-by-op arithmetic inside (an x^2, a product, ...) is not a peak."""
    from memsweep.measure.kernels import FusedRMSNorm
    from memsweep.measure.tracker import StorageTracker

    n, h = 64, 256
    x = torch.randn(n, h, requires_grad=True)
    w = torch.ones(h, requires_grad=True)
    with StorageTracker() as t:
        t.track(x)
        t.track(w)
        before = t.current.total
        y = FusedRMSNorm.apply(x, w, 1e-5)
    assert t.peak.total - before == n * h * 4 + n * 4
    del y


def test_a_compiled_graph_writes_only_what_an_extern_kernel_or_the_caller_reads():
    """Inductor fuses pointwise chains: exp(x) * 2 feeding a matmul is one buffer (the product),
    not two; the traced graph run counts what the fused kernels would write."""
    from memsweep.measure.compiled import Compiler
    from memsweep.measure.tracker import StorageTracker

    n = 256
    x = torch.randn(n, n, requires_grad=True)
    w = torch.randn(n, n, requires_grad=True)
    c = Compiler()

    def f(x, w):
        return ((x.exp() * 2.0) @ w).sum()

    with StorageTracker() as t:
        for v in (x, w):
            t.track(v)
        before = t.current.total
        loss = c.run(("f",), f, [x, w])
    # the product (read by the matmul, and saved for w's gradient) and the matmul's output: two
    # n x n fp32 buffers at most; op by op exp(x) would be a third
    assert t.peak.total - before <= 2 * n * n * 4 + 64
    loss.backward()
    assert torch.allclose(w.grad, ((x.detach().exp() * 2.0).t() @ torch.ones(n, n)))


# --- the trace and detailed, phase by phase -------------------------------------------------------------

CASES = {
    # every fused kernel, each precision's norm and loss, LoRA's frozen first norm, the soft-cap
    "llama-liger-train-mixed": ("llama3.2-1b", LIGER, dict()),
    "llama-flash-lora-pure": ("llama3.2-1b", FLASH, dict(wl="lora", precision="pure")),
    "llama-compile-train-mixed-full": ("llama3.2-1b", COMPILE, dict(recompute="full")),
    "qwen3-compile-lora-pure": ("qwen3-8b", COMPILE, dict(wl="lora", precision="pure")),
    "gemma2-ce-lora-mixed": ("gemma-2-2b", KernelsSpec(loss="fused"), dict(wl="lora")),
    "gpt2-fused-gelu-norm-train-pure": ("gpt2", KernelsSpec(norm="fused", mlp="fused"), dict(precision="pure")),
    # torchtitan's compile: the blocks alone, the loss eager (its fp32 logits and log-softmax)
    "qwen3-compile-blocks-train-pure": ("qwen3-8b", dataclasses.replace(COMPILE, compile_loss=False), dict(precision="pure")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_detailed_follows_the_fused_trace_phase_by_phase(case):
    from memsweep.measure.backends import measure

    name, kernels, kw = CASES[case]
    spec = job(small(name), measure=FAKE, seq=256, batch=2, kernels=kernels, **kw)
    m = measure(spec)
    assert m.status == "ok", m.error
    est = phase_peaks(Columns.from_specs([spec]))
    for phase, measured in m.phase_peaks.items():
        assert float(est[phase][0]) == pytest.approx(measured, rel=0.01), phase


def test_the_fused_kernels_save_what_detailed_says_they_save():
    """Each option alone against eager on one model: the trace's forward peak drops by what
    detailed says the option drops (mixed precision: a norm's fp32 row, the activation's output,
    the fp32 K of the training cache, the log-softmax for 16-bit logits)."""
    from memsweep.measure.backends import measure

    base = job(small("llama3.2-1b"), measure=FAKE, seq=256, batch=2)
    eager = measure(base).phase_peaks["forward"]
    eager_est = float(phase_peaks(Columns.from_specs([base]))["forward"][0])
    for option in ("norm", "mlp", "rope"):
        spec = dataclasses.replace(base, kernels=KernelsSpec(**{option: "fused"}))
        drop = eager - measure(spec).phase_peaks["forward"]
        assert drop > 0
        assert eager_est - float(phase_peaks(Columns.from_specs([spec]))["forward"][0]) == pytest.approx(drop, rel=1e-6)


def test_compile_loss_false_keeps_the_eager_losss_fp32_log_softmax():
    """kernels.compile_loss=false (torchtitan): the trace's forward peak is above the compiled
    loss's by what detailed says, the eager loss's fp32 log-softmax over its 16-bit logits."""
    from memsweep.measure.backends import measure

    base = job(small("llama3.2-1b"), measure=FAKE, seq=256, batch=2, precision="pure", kernels=COMPILE)
    blocks = dataclasses.replace(base, kernels=dataclasses.replace(COMPILE, compile_loss=False))
    rise = measure(blocks).phase_peaks["forward"] - measure(base).phase_peaks["forward"]
    est = [float(phase_peaks(Columns.from_specs([s]))["forward"][0]) for s in (base, blocks)]
    assert rise > 0 and est[1] - est[0] == pytest.approx(rise, rel=1e-6)
    assert blocks.kernels.label == "compile(blocks)" and "kernels.compile_loss=false" in blocks.kernels.used


# --- the config ------------------------------------------------------------------------------------------

def test_kernels_presets_compose_and_rows_say_which(compose_config):
    from memsweep.app.convert import to_job_spec

    for name, label in (("eager", "eager"), ("liger", "norm+mlp+rope+loss=fused_linear"),
                        ("flash_attn", "norm+mlp+rope+loss=fused"), ("compile", "compile")):
        spec = to_job_spec(compose_config(f"kernels={name}", "model=llama3-8b"))
        row = estimate_rows(spec, [FORMULAS["detailed"]])[0]
        assert row["kernels"] == label and row["status"] == "ok"
    legacy = job("llama3-8b", loss=LossSpec(fused=True))
    assert estimate_rows(legacy, [FORMULAS["detailed"]])[0]["kernels"] == "loss=fused_linear"
    same = job("llama3-8b", kernels=KernelsSpec(loss="fused_linear"))
    assert FORMULAS["detailed"](Columns.from_specs([legacy])).total[0] == FORMULAS["detailed"](Columns.from_specs([same])).total[0]


def test_the_fused_kernels_cut_the_estimate_where_they_cut_the_trace():
    base = job("llama3-8b", seq=4096, batch=2)
    totals = {k.name: float(FORMULAS["detailed"](Columns.from_specs([dataclasses.replace(base, kernels=k)])).total[0])
              for k in (KernelsSpec(), LIGER, FLASH, COMPILE)}
    assert totals["liger"] < totals["eager"] and totals["flash_attn"] < totals["eager"] and totals["compile"] < totals["eager"]


@pytest.mark.parametrize("make, key", [
    (lambda: job("llama3-8b", wl="inference", kernels=LIGER), "kernels.norm"),
    (lambda: job("llama3-8b", loss=LossSpec(fused=True), kernels=KernelsSpec(loss="fused")), "kernels.loss"),
    (lambda: job("llama3-8b", loss=LossSpec(chunks=8), kernels=KernelsSpec(loss="fused")), "loss.chunks"),
    (lambda: job("mixtral-8x7b", kernels=COMPILE), "kernels.compile"),
    (lambda: KernelsSpec(norm="apex"), "kernels.norm"),
    (lambda: KernelsSpec(loss="liger"), "kernels.loss"),
    (lambda: KernelsSpec(compile="yes"), "kernels.compile"),
])
def test_what_is_not_modelled_is_one_line_naming_the_key(make, key):
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.key == key and "\n" not in str(err.value)


def test_the_planner_takes_kernels_as_a_users_option():
    from memsweep.plan.cases import cases
    from memsweep.plan.spec import PlanSpec

    liger = PlanSpec(models=("llama3-8b",), hardware=("h100-80g",), seqs=(4096,), workloads=("train",), kernels="liger")
    jobs = [j for case in cases(liger) for _, j in case.jobs]
    assert jobs and all(j.kernels.name == "liger" and j.loss_kernel == "fused_linear" for j in jobs)
    with pytest.raises(ConfigError) as err:
        PlanSpec(models=("llama3-8b",), kernels="apex")
    assert err.value.key == "kernels"


def test_a_gpu_run_refuses_the_emulated_kernels_and_says_why():
    """The Functions' op-by-op arithmetic would reach the CUDA allocator's peak: measure=cuda with a
    fused kernel is a skipped row with the reason (compile runs Inductor itself there)."""
    from memsweep.measure.workloads import Unmeasurable, prepare

    for kernels in (LIGER, FLASH, KernelsSpec(norm="fused")):
        with pytest.raises(Unmeasurable) as err:
            prepare(job(small("llama3.2-1b"), seq=64, kernels=kernels), "cuda")
        assert "emulated" in str(err.value) and "\n" not in str(err.value)


def test_the_time_model_sees_a_fused_loss():
    """A fused cross-entropy reads and writes the 16-bit logits (6 bytes each, FUSED_LOSS_BYTES_PER_LOGIT)
    where the eager one moves 24: the step's traffic drops by exactly that, and its estimated time
    never grows (a compute-bound step keeps its time)."""
    from memsweep.formulas import work

    base = job("llama3-8b", seq=4096, batch=2)
    rows = {k.name: estimate_rows(dataclasses.replace(base, kernels=k), [FORMULAS["detailed"]])[0]
            for k in (KernelsSpec(), FLASH, COMPILE, LIGER)}
    assert rows["flash_attn"]["est_step_time_s"] <= rows["eager"]["est_step_time_s"]
    assert rows["compile"]["est_step_time_s"] == pytest.approx(rows["flash_attn"]["est_step_time_s"], rel=1e-9)
    c = Columns.from_specs([base])
    eager_bytes = work.training_work(c)[5] + work.training_work(c)[6]
    fused = Columns.from_specs([dataclasses.replace(base, kernels=FLASH)])
    fused_bytes = work.training_work(fused)[5] + work.training_work(fused)[6]
    t_v = 2 * 4096 * base.model.vocab
    assert float(eager_bytes[0] - fused_bytes[0]) == pytest.approx(t_v * (work.LOSS_BYTES_PER_LOGIT - work.FUSED_LOSS_BYTES_PER_LOGIT))


@pytest.mark.parametrize("kernels", [LIGER, FLASH, COMPILE], ids=["liger", "flash_attn", "compile"])
def test_fake_equals_cpu_for_every_kernels_option(kernels):
    """The same step on real CPU tensors (the Functions' arithmetic, the compiled graphs run on
    data) has every phase peak of the fake trace, byte for byte (the CPU's SDPA kernels on both)."""
    from memsweep.measure.backends import measure

    tiny = dataclasses.replace(model("llama3-8b"), name="tiny-llama", layers=2, hidden=256, heads=4, kv_heads=2,
                               ffn=768, vocab=1024)
    peaks = {}
    for backend in ("fake", "cpu"):
        m = measure(job(tiny, seq=64, batch=2, kernels=kernels,
                        measure=MeasureSpec(backend, backend, sdpa="device", warmup=1, repeats=1)))
        assert m.status == "ok", m.error
        peaks[backend] = m.phase_peaks
    assert peaks["fake"] == peaks["cpu"]
