"""Reference torch models: exact parameter counts, attention and recompute equivalence, KV cache,
FakeTensorMode."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from memsweep.columns import Columns, base_params, lora_params  # noqa: E402
from memsweep.measure.models import build_model  # noqa: E402
from memsweep.presets import job_spec, model_spec, preset_names  # noqa: E402
from memsweep.specs import ModelSpec, Workload  # noqa: E402

MODEL_DIR = Path(__file__).parents[1] / "conf" / "model"
PRESETS = preset_names("model")
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


load_spec = model_spec


def columns(spec: ModelSpec, workload: Workload | None = None) -> Columns:
    job = job_spec(spec, wl=workload or "train", seq=min(128, spec.max_positions))
    return Columns.from_specs([job])


def small_spec(family: str) -> ModelSpec:
    """A few-layer gpt2- or bert-family spec for real CPU runs."""
    bert = family == "bert"
    return ModelSpec(
        name=f"small-{family}", family=family, layers=2, hidden=64, heads=4, kv_heads=4, ffn=256,
        vocab=128, max_positions=64, norm="layernorm", mlp="gelu", position="learned",
        qkv_bias=True, out_bias=True, mlp_bias=True, tied_embeddings=True,
        type_vocab=2 if bert else 0, pooler=bert,
    )


def numel(params) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_count_matches_analytic(name: str) -> None:
    spec = load_spec(name)
    model = build_model(spec, device="meta")
    assert numel(model.parameters()) == int(base_params(columns(spec))[0])
    # The preset's header cites the HF model's num_parameters(); check that golden number too.
    header = "".join(line for line in (MODEL_DIR / f"{name}.yaml").read_text().splitlines()
                     if line.startswith("#"))
    if (m := re.search(r"([\d,]+) parameters", header)):
        assert numel(model.parameters()) == int(m.group(1).replace(",", ""))


@pytest.mark.parametrize(("name", "targets"), [
    ("llama2-7b", ("q", "k", "v", "o")),
    ("gpt2", ("q", "k", "v", "o")),
    ("tiny", ALL_TARGETS),
])
def test_lora_parameter_count_and_freezing(name: str, targets: tuple[str, ...]) -> None:
    spec, rank = load_spec(name), 8
    model = build_model(spec, lora_rank=rank, lora_targets=targets, device="meta")
    workload = Workload("lora", "lora", lora_rank=rank, lora_targets=targets)
    assert numel(model.lora_parameters()) == int(lora_params(columns(spec, workload))[0])
    assert numel(model.base_parameters()) == int(base_params(columns(spec))[0])
    assert not any(p.requires_grad for p in model.base_parameters())
    assert all(p.requires_grad for p in model.lora_parameters())


def test_bad_options_raise() -> None:
    spec = small_spec("gpt2")
    for kwargs in ({"attention": "flash"}, {"recompute": "some"},
                   {"lora_rank": 4, "lora_targets": ("gate",)}, {"lora_rank": 4}):
        with pytest.raises(ValueError):
            build_model(spec, device="meta", **kwargs)
    with pytest.raises(ValueError):
        build_model(small_spec("bert"), device="meta").new_cache(1, 8)


def _pair(spec: ModelSpec, **kwargs):
    """A model with fresh weights and a copy of it built with other options."""
    torch.manual_seed(0)
    base = build_model(spec)
    other = build_model(spec, **kwargs)
    other.load_state_dict(base.state_dict(), strict=False)  # LoRA adds keys the base lacks
    return base, other


@pytest.mark.parametrize("spec", [load_spec("tiny"), small_spec("gpt2"), small_spec("bert")],
                         ids=lambda s: s.name)
def test_eager_matches_sdpa(spec: ModelSpec) -> None:
    sdpa, eager = _pair(spec, attention="eager")
    ids = torch.randint(0, spec.vocab, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(eager(ids), sdpa(ids), atol=1e-5, rtol=1e-5)


def _loss_and_grads(model, ids: torch.Tensor):
    model.train()
    model.zero_grad()
    logits = model(ids[:, :-1])  # (B, T-1, V)
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("spec", [load_spec("tiny"), small_spec("gpt2"), small_spec("bert")],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_matches_none(spec: ModelSpec, recompute: str) -> None:
    plain, ckpt = _pair(spec, recompute=recompute)
    ids = torch.randint(0, spec.vocab, (2, 16))
    loss, grads = _loss_and_grads(plain, ids)
    loss_ckpt, grads_ckpt = _loss_and_grads(ckpt, ids)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    # Every weight but bert's pooler (which MLM logits never use) gets a gradient.
    no_grad = {n for n, _ in plain.named_parameters()} - grads.keys()
    assert no_grad <= {"pooler.weight", "pooler.bias"}
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_lora_starts_at_base_model_and_trains_adapters_only() -> None:
    spec = load_spec("tiny")
    base, lora = _pair(spec, lora_rank=4, lora_targets=ALL_TARGETS)
    ids = torch.randint(0, spec.vocab, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(lora(ids), base(ids))  # B = 0 at init
    _loss_and_grads(lora, ids)
    assert all(p.grad is None for p in lora.base_parameters())
    assert all(p.grad is not None for p in lora.lora_parameters())


@pytest.mark.parametrize("spec", [load_spec("tiny"), small_spec("gpt2")], ids=lambda s: s.name)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_kv_cache_decode_matches_full_forward(spec: ModelSpec, attention: str) -> None:
    torch.manual_seed(0)
    model = build_model(spec, attention=attention).eval()
    B, T, max_tokens = 2, 12, 16
    ids = torch.randint(0, spec.vocab, (B, T))
    with torch.no_grad():
        full = model(ids)  # (B, T, V)

        cache = model.new_cache(B, max_tokens)  # empty; it grows as transformers' DynamicCache
        assert len(cache.k) == len(cache.v) == spec.layers
        assert all(t.shape == (B, spec.kv_heads, 0, spec.dim_per_head) for t in cache.k + cache.v)
        model(ids[:, :-1], cache)  # prefill T-1 tokens
        assert cache.length == T - 1
        assert all(t.shape == (B, spec.kv_heads, T - 1, spec.dim_per_head) for t in cache.k + cache.v)
        last = model(ids[:, -1:], cache, last_only=True)  # decode the last one
        assert last.shape == (B, 1, spec.vocab) and cache.length == T
        torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)

        # Chunks after cached tokens need the shifted causal mask.
        cache = model.new_cache(B, max_tokens)
        chunks = [model(ids[:, a:b], cache) for a, b in ((0, 5), (5, 9), (9, T))]
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError):
            model(ids[:, :5], cache)  # 12 cached + 5 > 16


def test_fake_tensor_7b_forward() -> None:
    spec = load_spec("llama2-7b")
    with FakeTensorMode():
        model = build_model(spec, dtype=torch.bfloat16)
        ids = torch.randint(0, spec.vocab, (1, 16))
        with torch.no_grad():
            logits = model(ids)
    assert logits.shape == (1, 16, spec.vocab)
    assert logits.dtype == torch.bfloat16


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_fake_tensor_train_step_and_decode(recompute: str) -> None:
    spec = load_spec("tiny")
    with FakeTensorMode():
        model = build_model(spec, recompute=recompute, lora_rank=4, lora_targets=("q", "v"),
                            dtype=torch.bfloat16)
        ids = torch.zeros(2, 32, dtype=torch.long)
        model(ids).float().sum().backward()
        assert all(p.grad is not None for p in model.lora_parameters())
        with torch.no_grad():
            cache = model.new_cache(2, 40)
            model(ids, cache)
            logits = model(ids[:, :1], cache, last_only=True)
    assert logits.shape == (2, 1, spec.vocab) and cache.length == 33


def _saved_bytes(model, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one forward (what recompute trades away)."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(sizes)


def test_recompute_saves_less() -> None:
    spec = load_spec("tiny")
    ids = torch.randint(0, spec.vocab, (2, 64))
    saved = {rc: _saved_bytes(build_model(spec, attention="eager", recompute=rc).train(), ids)
             for rc in ("none", "selective", "full")}
    assert saved["full"] < saved["selective"] < saved["none"]
    # Out of training (eval or no_grad) nothing is checkpointed.
    eval_model = build_model(spec, attention="eager", recompute="full").eval()
    assert _saved_bytes(eval_model, ids) == saved["none"]
