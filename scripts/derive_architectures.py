"""Derive `detailed`'s coefficients for the newer architectures (issue 10), from the reference
implementation, on top of the classic llama tables.

    python scripts/derive_architectures.py            # rewrites src/memsweep/formulas/coefficients_ext.py
    python scripts/derive_architectures.py --jobs 2   # two processes

    python scripts/derive_architectures.py --jobs 2 --modes mixed/train/none/sdpa   # refit some modes
    python scripts/derive_architectures.py --jobs 2 --modes pure16/train/none/eager --classes base

For every llama-family mode (precision x workload x recompute x attention) it runs the reference
training step under FakeTensorMode on a design of 480 small models built from RECIPES (each newer
feature alone, and the combinations real models use: Gemma, Qwen-MoE, OLMoE, gpt-oss, DeepSeek,
Falcon, GPT-NeoX, Starcoder2, Cohere, Phi-3) with random sizes, subtracts what the classic table
(coefficients.py) predicts, and solves, per architecture class (basis.EXT_CLASSES), for the bytes
per term of `EXT_BASIS` (formulas/basis.py), each zero for a classic model. A fit that reproduces
every design point to the byte is marked exact; otherwise the least-squares fit is kept with its
worst residual (coefficients_ext.QUALITY); docs/accuracy-architectures.md reports the error on
the full-size presets. The table is rewritten after every mode, so an interrupted run keeps its fits.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ["MEMSWEEP_DERIVING"] = "1"  # detailed.py may import a table fitted on an older basis
sys.path.insert(0, str(ROOT / "scripts"))

from derive_coefficients import LORA_SETS, PRECISIONS  # noqa: E402

from memsweep.columns import Columns  # noqa: E402
from memsweep.formulas.basis import (  # noqa: E402
    EAGER_ONLY, EXT_BASIS, EXT_CLASSES, basis_values, ext_basis_values, ext_class,
)
from memsweep.formulas.detailed import _coefficients, held_mask_bytes  # noqa: E402
from memsweep.specs import ModelSpec  # noqa: E402

WORKLOADS = ("train", "lora-qv", "lora-qkvo", "lora-mlp", "lora-all")
RECOMPUTES = ("none", "full")
ATTENTIONS = ("sdpa", "eager")
POINTS = 480
SEED = 10


# Recipes: one feature at a time, and the combinations real models use (each named after one).
RECIPES: dict[str, dict] = {
    "plain": {}, "bias": dict(qkv_bias=True, out_bias=True, mlp_bias=True), "tied": dict(tied_embeddings=True),
    "layernorm": dict(norm="layernorm"), "layernorm-nobias": dict(norm="layernorm_nobias"),
    "gelu": dict(mlp="gelu"), "geglu": dict(mlp="geglu"), "sandwich": dict(block_norms=4),
    "parallel-1": dict(block="parallel", block_norms=1), "parallel-2": dict(block="parallel", block_norms=2),
    "qk-head": dict(qk_norm="head"), "qk-full": dict(qk_norm="full"), "partial-rope": dict(rotary_fraction=0.5),
    "window": dict(window=True), "sinks": dict(attention_sinks=True), "moe": dict(moe=True),
    "moe-shared": dict(moe=True, shared=True), "moe-dense": dict(moe=True, dense=True), "mla": dict(mla=True),
    # real combinations
    "gemma-2": dict(mlp="geglu", block_norms=4, window=True, tied_embeddings=True),
    "gemma-3": dict(mlp="geglu", block_norms=4, window=True, qk_norm="head", tied_embeddings=True),
    "qwen3-moe": dict(qk_norm="head", moe=True), "olmoe": dict(qk_norm="full", moe=True),
    "qwen2-moe": dict(qkv_bias=True, moe=True, shared=True),
    "gpt-oss": dict(qkv_bias=True, out_bias=True, mlp_bias=True, moe=True, router_bias=True, attention_sinks=True, window=True),
    "deepseek": dict(mla=True, moe=True, shared=True, dense=True),
    "falcon": dict(block="parallel", block_norms=1, norm="layernorm", mlp="gelu", mqa=True),
    "neox": dict(block="parallel", block_norms=2, norm="layernorm", mlp="gelu", rotary_fraction=0.25, qkv_bias=True,
                 out_bias=True, mlp_bias=True),
    "starcoder2": dict(norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, window=True),
    "cohere": dict(block="parallel", block_norms=1, norm="layernorm_nobias", tied_embeddings=True),
    "phi-3": dict(window=True),
}


def design(n: int = POINTS, seed: int = SEED, recipes: tuple[str, ...] = tuple(RECIPES)) -> list[tuple[ModelSpec, int, int, int]]:
    """(model, seq, batch, lora rank): small llama-family models, each built by a recipe, with random dims."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        recipe = dict(RECIPES[recipes[len(out) % len(recipes)]])
        L = int(rng.integers(2, 5))
        a = int(rng.choice([2, 3, 4, 6, 8]))
        kv = 1 if recipe.pop("mqa", False) else int(rng.choice([d for d in range(1, a + 1) if a % d == 0]))
        h = int(rng.choice([48, 64, 96, 128, 160, 192]))
        d = int(rng.choice([8, 12, 16, 24, 32])) if rng.random() < 0.6 else None
        if d is None and (h % a or (h // a) % 4):
            d = 16
        spec = dict(name="design", family="llama", layers=L, hidden=h, heads=a, kv_heads=kv,
                    ffn=int(rng.integers(3, 12)) * 16, vocab=int(rng.integers(20, 60)) * 50, max_positions=4096,
                    norm="rmsnorm", mlp="swiglu", position="rope", qkv_bias=False, out_bias=False,
                    mlp_bias=False, tied_embeddings=False, head_dim=d)
        s, b = int(rng.integers(3, 12)) * 8, int(rng.integers(1, 4))
        if recipe.pop("window", False):
            spec.update(sliding_window=int(rng.integers(2, 10)) * 8,
                        layer_pattern=(("local",), ("local", "global"), ("local", "local", "global"))[int(rng.integers(0, 3))][:L])
        if recipe.pop("moe", False):
            E = int(rng.choice([3, 4, 6, 8]))
            spec.update(experts=E, experts_per_token=int(rng.integers(1, min(E, 3) + 1)),
                        expert_ffn=int(rng.integers(2, 8)) * 16)
            if recipe.pop("shared", False):
                spec.update(shared_experts=int(rng.integers(1, 3)), shared_expert_gate=bool(rng.random() < 0.5),
                            shared_ffn=int(rng.integers(2, 6)) * 16 if rng.random() < 0.5 else 0)
            if recipe.pop("dense", False):
                spec["dense_layers"] = int(rng.integers(1, L))
        if recipe.pop("mla", False):  # every head its own keys; values no wider than keys, as in DeepSeek
            rope, nope = int(rng.choice([4, 8])), int(rng.choice([8, 12, 16]))
            spec.update(kv_heads=a, head_dim=rope + nope, kv_lora_rank=int(rng.choice([16, 24, 32])),
                        rope_head_dim=rope, v_head_dim=int(rng.choice([v for v in (8, 12, 16) if v <= nope + rope])),
                        q_lora_rank=int(rng.choice([0, 24, 40])))
        spec.update(recipe)
        try:
            m = ModelSpec(**spec)
        except ValueError:
            continue
        if m.rope_dim % 2:
            continue
        out.append((m, s, b, (8, 4)[len(out) % 2]))
    return out


def lora_targets(m: ModelSpec, label: str) -> tuple[str, ...]:
    return tuple(t for t in LORA_SETS[label] if not (t == "gate" and m.mlp == "gelu"))


def observe(args) -> tuple[float, list[float], int]:
    """(residual bytes after the classic table, extended basis row, architecture class)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memsweep.measure.tracker import StorageTracker
    from memsweep.measure.autocast import cuda_policy
    from memsweep.measure.workloads import prepare
    from memsweep.presets import job_spec, workload_spec

    mode, (m, s, b, rank) = args
    precision, wl, rc, att = mode
    dtype, pmode = PRECISIONS[precision]
    w = (workload_spec("lora", lora_rank=rank, lora_targets=lora_targets(m, wl.split("-")[1]))
         if wl.startswith("lora") else workload_spec(wl))
    spec = job_spec(m, wl=w, seq=s, batch=b, dtype=dtype, precision=pmode, recompute=rc, attention=att)
    torch.manual_seed(0)
    with cuda_policy(), FakeTensorMode(), StorageTracker() as tracker:  # GPU autocast (measure/autocast.py)
        prepare(spec, "cpu", tracker).step()
    c = Columns.from_specs([spec])
    classic = np.array(_coefficients("llama", precision, wl, rc, att, "saved"))
    predicted = float(classic @ basis_values(c)[0]) + float(held_mask_bytes(c)[0])  # (its own term)
    return (tracker.marks["after_forward"]["activations"] - predicted, list(ext_basis_values(c)[0]),
            int(ext_class(c)[0]))


def fit(rows: np.ndarray, ys: np.ndarray, eager: bool = True) -> tuple[list[float], bool, float]:
    """Exact quarter-byte coefficients when they exist, else least squares; and the worst
    residual in bytes. Without eager attention the EAGER_ONLY terms stay 0."""
    live = np.abs(rows).max(axis=0) > 0
    if not eager:
        live &= np.array([n not in EAGER_ONLY for n in EXT_BASIS])
    coef = np.zeros(rows.shape[1])
    sol, *_ = np.linalg.lstsq(rows[:, live], ys, rcond=None)
    exact = np.round(sol * 4) / 4
    if np.abs(rows[:, live] @ exact - ys).max() == 0:
        coef[live] = exact
        return [float(v) for v in coef], True, 0.0
    coef[live] = sol
    return [float(v) for v in coef], False, float(np.abs(rows @ coef - ys).max())


def load_table(out: Path) -> tuple[dict, dict]:
    """The fits already written (kept when the basis is unchanged), so runs can add modes."""
    if not out.exists():
        return {}, {}
    import importlib.util

    spec = importlib.util.spec_from_file_location("coefficients_ext_old", out)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    # by term name: a term added since reads 0 until its mode is refitted
    table = {k: [dict(zip(old.EXT_BASIS, v)).get(n, 0.0) for n in EXT_BASIS] for k, v in old.EXT_COEFFICIENTS.items()}
    return table, dict(old.QUALITY)


def write_table(out: Path, table: dict, quality: dict) -> None:
    lines = [
        '"""Generated by scripts/derive_architectures.py from the reference implementation: do not edit.',
        "",
        "Bytes per term of EXT_BASIS (the newer architectures' terms, zero for a classic model), added to",
        "the classic llama table of coefficients.py. QUALITY: (exact fit, worst residual bytes on the design).",
        '"""',
        "",
        f"EXT_BASIS = {EXT_BASIS!r}",
        "",
        "EXT_COEFFICIENTS: dict[str, tuple[float, ...]] = {",
        *[f"    {k!r}: {tuple(v)!r}," for k, v in sorted(table.items())],
        "}",
        "",
        "QUALITY: dict[str, tuple[bool, float]] = {",
        *[f"    {k!r}: {v!r}," for k, v in sorted(quality.items())],
        "}",
        "",
    ]
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--modes", nargs="*", help="only these precision/workload/recompute/attention, in this order")
    parser.add_argument("--classes", nargs="*", choices=EXT_CLASSES,
                        help="refit only these architecture classes (their design points alone), keeping the rest")
    args = parser.parse_args(argv)
    points = design()
    if args.classes:
        from memsweep.presets import job_spec

        wanted = {EXT_CLASSES.index(k) for k in args.classes}
        points = [p for p in points if int(ext_class(Columns.from_specs([job_spec(p[0], seq=p[1], batch=p[2])]))[0]) in wanted]
    modes = ([tuple(m.split("/")) for m in args.modes] if args.modes
             else list(itertools.product(PRECISIONS, WORKLOADS, RECOMPUTES, ATTENTIONS)))
    out = ROOT / "src" / "memsweep" / "formulas" / "coefficients_ext.py"
    table, quality = load_table(out) if args.modes else ({}, {})
    with Pool(args.jobs) as pool:
        for mode in modes:
            obs = pool.map(observe, [(mode, p) for p in points])
            ys = np.array([o[0] for o in obs])
            rows = np.array([o[1] for o in obs])
            classes = np.array([o[2] for o in obs])
            for k, cls in enumerate(EXT_CLASSES):
                if args.classes and cls not in args.classes:
                    continue
                # a class is fitted on its own points; MoE and MLA (many terms) also on the base
                # recipes (single features), which pin the terms they share
                sel = (classes == k) | ((classes == 0) & (cls in ("moe", "mla")))
                coef, exact, worst = fit(rows[sel], ys[sel], eager=mode[3] == "eager")
                key = "/".join(("llama", cls, *mode, "saved"))
                table[key], quality[key] = coef, (exact, worst)
                print(f"{key} ({sel.sum()} points): {'exact' if exact else f'least squares, worst residual {worst:.0f} B'}",
                      flush=True)
            write_table(out, table, quality)  # after every mode: an interrupted run keeps its fits
    print(f"{len(table)} fits in {out} ({sum(q[0] for q in quality.values())} exact)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
