"""`measure.impl=torchtune` (issue 25, part 4): torchtune 0.6.1's own modules and recipe step,
traced under fake tensors. Skipped where the `torchtune` extra is not installed."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("torchtune")
torch = pytest.importorskip("torch")

from memsweep.measure.backends import measure  # noqa: E402
from memsweep.presets import job_spec, model_spec, workload_spec  # noqa: E402
from memsweep.specs import LossSpec, MeasureSpec, OffloadSpec, OptimizerSpec  # noqa: E402

TT = MeasureSpec("fake", "fake", impl="torchtune")
SEQ, BATCH = 256, 2


def spec(model="llama3.2-3b", layers=2, wl="train", **top):
    m = model_spec(model, layers=layers)
    workload = wl if not isinstance(wl, str) else workload_spec(wl, use_cache=False)
    kw = dict(seq=SEQ, batch=BATCH, precision="pure", hardware="a100-80g")
    kw.update(top)
    return job_spec(m, wl=workload, measure=TT, **kw)


def rope_cache_bytes(m) -> int:
    """torchtune's RoPE buffers, one module shared by the layers: the cache (max_seq_len,
    head_dim / 2, 2) and Llama3ScaledRoPE's theta (head_dim / 2), fp32."""
    return m.max_positions * (m.dim_per_head // 2) * 2 * 4 + (m.dim_per_head // 2) * 4


def block_matrices(m) -> list[int]:
    d, kv = m.dim_per_head, m.kv_heads * m.dim_per_head
    return [m.hidden * m.hidden, m.hidden * kv, m.hidden * kv, m.hidden * m.hidden] + [m.hidden * m.ffn] * 3


def test_a_full_finetune_holds_the_bf16_weights_and_the_recipes_rope_cache():
    s = spec(wl="train")
    r = measure(s)
    assert r.status == "ok", r.error
    m = s.model
    params = m.vocab * m.hidden + m.layers * (sum(block_matrices(m)) + 2 * m.hidden) + m.hidden  # tied head
    assert r.breakdown["weights"] == 2 * params + rope_cache_bytes(m)
    assert 0 < r.breakdown["gradients"] <= 2 * params  # the peak is in the backward, gradients landing


def test_qlora_counts_each_nf4_tensor_by_its_inner_tensors():
    """torchao's NF4Tensor (block 64, int8 scalers double-quantized in blocks of 256, bf16 factors,
    a bf16 mean, its own 16-entry bf16 table) is a wrapper subclass with no storage of its own:
    the tracker counts its inner tensors. The frozen LoRA base is quantized, the embedding is not."""
    qlora = dataclasses.replace(workload_spec("qlora-torchtune", use_cache=False), lora_rank=8)
    s = spec(wl=qlora)
    r = measure(s)
    assert r.status == "ok", r.error
    m = s.model

    def nf4(n: int) -> int:
        return n // 2 + n // 64 + (n // 64 // 256) * 2 + 2 + 16 * 2

    rank, d, kv = 8, m.dim_per_head, m.kv_heads * m.dim_per_head
    outs = {"q": m.hidden, "k": kv, "v": kv, "o": m.hidden, "gate": m.ffn, "up": m.ffn, "down": m.hidden}
    ins = {"q": m.hidden, "k": m.hidden, "v": m.hidden, "o": m.hidden, "gate": m.hidden, "up": m.hidden, "down": m.ffn}
    adapters = sum(rank * (ins[t] + outs[t]) for t in qlora.lora_targets)
    per_layer = sum(nf4(n) for n in block_matrices(m)) + 2 * 2 * m.hidden + 2 * adapters
    expected = 2 * m.vocab * m.hidden + 2 * m.hidden + m.layers * per_layer + rope_cache_bytes(m)
    assert r.breakdown["weights"] == expected


def test_offloading_moves_the_checkpoints_off_the_device_but_the_stash():
    """torchtune's OffloadActivations under recompute=full: each layer's checkpointed input goes to
    the host; the last 5 offloaded tensors stay on the device until their copies are done."""
    base = dict(layers=8, recompute="full", loss=LossSpec(chunks=8))
    kept = measure(spec(**base))
    off = measure(spec(**base, offload=OffloadSpec(activations=True)))
    assert kept.status == off.status == "ok", (kept.error, off.error)
    checkpoint = BATCH * SEQ * 3072 * 2
    saved = kept.phase_peaks["forward"] - off.phase_peaks["forward"]
    assert saved >= (8 - 5) * checkpoint
    assert saved <= 8 * checkpoint + 4 * BATCH * SEQ * 3072 * 4  # not more than was offloadable


def test_optimizer_in_backward_never_holds_every_gradient():
    adamw = measure(spec(optimizer=OptimizerSpec("adamw", "foreach")))
    fused = measure(spec(optimizer=OptimizerSpec("adamw", "foreach", in_backward=True)))
    assert adamw.status == fused.status == "ok"
    assert fused.phase_peaks["optimizer"] < adamw.phase_peaks["optimizer"]
    assert fused.peak_bytes < adamw.peak_bytes


def test_chunked_loss_keeps_no_full_fp32_copy_of_the_logits():
    """One piece: `unembed` upcasts the whole (b, s, V) logits (fp32) and cross-entropy saves their
    log-softmax beside them. Eight chunks (CEWithChunkedOutputLoss): the bf16 chunks, each chunk's
    saved log-softmax and one chunk's fp32 upcast at a time, so the forward saves the fp32 copy
    less the bf16 logits and one fp32 chunk."""
    one = measure(spec())
    eight = measure(spec(loss=LossSpec(chunks=8)))
    assert one.status == eight.status == "ok"
    fp32_logits = BATCH * SEQ * 128256 * 4
    expected = fp32_logits - fp32_logits // 2 - fp32_logits // 8
    saved = one.phase_peaks["forward"] - eight.phase_peaks["forward"]
    assert abs(saved - expected) <= 0.01 * expected, (saved, expected)


@pytest.mark.parametrize("change, why", [
    (dict(precision="mixed"), "no autocast"),
    (dict(wl=workload_spec("inference")), "inference"),
    (dict(attention="eager"), "attention=eager"),
    (dict(recompute="selective"), "every k-th layer"),
    (dict(model="mixtral-8x7b"), "mixture of experts"),
    (dict(model="gemma-2-2b"), "soft-capping"),
    (dict(wl=workload_spec("lora", lora_targets=["q", "gate"], use_cache=False)), "MLP as a whole"),
    (dict(wl=workload_spec("lora", lora_targets=["gate", "up", "down"], use_cache=False)), "at least one attention"),
    (dict(wl=workload_spec("train", use_cache=True)), "use_cache"),
    (dict(wl=workload_spec("qlora", use_cache=False)), "kbit_prepare"),
])
def test_what_torchtune_does_not_run_is_skipped_with_the_reason(change, why):
    r = measure(spec(**change))
    assert r.status == "skipped" and why in r.error, r.error


def test_lora_trains_only_the_adapters_in_bf16():
    wl = workload_spec("lora", lora_rank=16, lora_targets=["q", "v", "o", "gate", "up", "down"], use_cache=False)
    s = spec(wl=wl, optimizer=OptimizerSpec("adamw", "fused"))
    r = measure(s)
    assert r.status == "ok", r.error
    m = s.model
    per_layer = 16 * ((m.hidden + m.hidden) + (m.hidden + m.kv_heads * m.dim_per_head) + (m.hidden + m.hidden)
                      + 2 * (m.hidden + m.ffn) + (m.ffn + m.hidden))
    tensors = 2 * 6 * m.layers  # lora_a and lora_b of 6 targets per layer
    assert r.breakdown["optimizer"] == 2 * 2 * m.layers * per_layer + 4 * tensors  # AdamW m and v, bf16; fp32 steps


def test_the_ladders_compiled_loss_saves_the_partitioners_set():
    """scripts/torchtune_ladder.py traces the recipe's compiled loss with the saved set AOTAutograd's
    min-cut partitioner (Inductor's) chooses: for cross-entropy on bf16 logits, the logits and
    labels themselves and two fp32 numbers per row, no (rows, V) fp32 tensor (eager keeps one)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "torchtune_ladder.py"
    ladder_spec = importlib.util.spec_from_file_location("torchtune_ladder", path)
    ladder = importlib.util.module_from_spec(ladder_spec)
    ladder_spec.loader.exec_module(ladder)
    saved = ladder.partition_saved(64, 1000, torch.bfloat16)
    assert sorted(s for s in saved if s[0] == "input") == [("input", 0), ("input", 1)]
    new = [s for s in saved if s[0] != "input"]
    assert new and all(shape == (64, 1) and dtype == torch.float32 for shape, dtype in new)
    with ladder.loss_compiled():
        r = measure(spec(loss=LossSpec(chunks=8)))
    eager = measure(spec(loss=LossSpec(chunks=8)))
    assert r.status == eager.status == "ok"
    chunk_fp32 = BATCH * SEQ // 8 * 128256 * 4
    assert eager.phase_peaks["forward"] - r.phase_peaks["forward"] >= 8 * chunk_fp32
