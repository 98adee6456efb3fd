"""Derive `detailed`'s activation coefficients from the reference implementation, exactly.

    python scripts/derive_coefficients.py          # rewrites src/memsweep/formulas/coefficients.py
    python scripts/derive_coefficients.py --jobs 2 # two processes

For every mode (family x precision x workload x recompute x attention) it runs the reference step
under FakeTensorMode on a design of small models (varying layers, tokens, hidden, heads, KV heads,
FFN and vocabulary) and solves for the integer bytes that multiply each structural term (a mode with no exact fit,
mixed-precision LoRA, keeps its least-squares fit, listed in APPROXIMATE with its residual; QLoRA
after peft's prepare_model_for_kbit_training under autocast, `kbit`, is that mixed fit plus the
exact difference of the two traces, when it has no exact fit of its own):

    L*t*h, L*t*kv*d, L*t*f, L*t*a, L*t, L*t*r, L*linear, L*lora, L*h, L*f, L*r,
    t*h, t*kv*d, t*f, t*a, t*r, t*V, t, V*h, s*d, s, h, V, L*b*a*s^2, L*s^2, b*a*s^2, 1
(terms without L: what the first or last layer keeps differently, e.g. with MLP-only adapters
nothing below layer 1 needs a gradient, so its attention keeps nothing: not even its eager
probabilities, b*a*s^2)

for the activations autograd has saved when the forward (and the loss) ends, in a training step
(train or LoRA). Moments that are a maximum of several (backward under full recompute, prefill)
are not linear in these terms and are modelled in detailed.py instead. A fit is exact when it
reproduces every design point to the byte; the others are listed in APPROXIMATE. The coefficients are facts about the reference PyTorch code (which tensors
autograd keeps, which autocast copies), so they change only when that code changes:
tests/test_detailed_accuracy.py checks them against fresh fake measurements.
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

from memsweep.columns import Columns  # noqa: E402
from memsweep.formulas.basis import BASIS, basis_values  # noqa: E402
from memsweep.formulas.detailed import KBIT_PRECISIONS as KBIT, held_mask_bytes  # noqa: E402
from memsweep.measure.autocast import cuda_policy  # noqa: E402
from memsweep.measure.tracker import StorageTracker  # noqa: E402
from memsweep.measure.workloads import prepare  # noqa: E402
from memsweep.presets import job_spec, workload_spec  # noqa: E402
from memsweep.specs import ModelSpec  # noqa: E402

FAMILIES = ("gpt2", "llama", "bert")
PRECISIONS = {"mixed": ("bf16", "mixed"), "pure16": ("bf16", "pure"), "fp32": ("fp32", "pure"),
              "kbit": ("bf16", "mixed"), "kbit16": ("bf16", "pure")}
# kbit / kbit16 (KBIT): QLoRA after peft's prepare_model_for_kbit_training (an NF4 base, every
# other parameter fp32), with and without autocast: LoRA only
# inference peaks are a max of moments: written by hand in detailed.py. LoRA saves different
# tensors depending on which matrices carry adapters, so each common target set has its own fit.
WORKLOADS = ("train", "lora-qv", "lora-qkvo", "lora-mlp", "lora-all")
LORA_SETS = {"qv": ("q", "v"), "qkvo": ("q", "k", "v", "o"),
             "mlp": ("gate", "up", "down"), "all": ("q", "k", "v", "o", "gate", "up", "down")}


def lora_targets(family: str, label: str) -> tuple[str, ...]:
    """GELU MLPs (gpt2, bert) have no gate matrix."""
    return tuple(t for t in LORA_SETS[label] if not (t == "gate" and family != "llama"))
# Exact fits for recompute none/full, sdpa (memory-efficient) and eager (materialised scores);
# selective recompute is not linear in these terms and is approximated in detailed.py.
RECOMPUTES = ("none", "full")
ATTENTIONS = ("sdpa", "eager")
LORA_RANKS = (8, 4)  # alternated over the design so the rank term is identifiable

# L, s, b, h, a, kv, f, V: ratios like real models (V >> h, f ~ 2.7-4 h), small enough to be fast
DESIGN = [
    (2, 64, 2, 256, 8, 2, 688, 4000), (3, 64, 2, 256, 8, 2, 688, 4000), (2, 128, 2, 256, 8, 2, 688, 4000),
    (3, 128, 2, 256, 8, 2, 688, 4000), (2, 64, 2, 256, 8, 8, 688, 4000), (3, 64, 2, 256, 8, 8, 688, 4000),
    (2, 64, 2, 256, 8, 2, 1024, 4000), (3, 64, 2, 256, 8, 2, 1024, 4000), (2, 64, 2, 256, 8, 2, 688, 6000),
    (2, 64, 2, 384, 8, 2, 1024, 4000), (3, 64, 2, 384, 8, 2, 1024, 4000), (2, 64, 2, 256, 4, 2, 688, 4000),
    (3, 64, 2, 256, 4, 2, 688, 4000), (2, 64, 4, 256, 8, 2, 688, 4000), (3, 128, 4, 384, 4, 4, 1024, 6000),
    (2, 32, 3, 128, 4, 1, 352, 3000), (4, 96, 1, 192, 6, 3, 512, 5000), (3, 48, 2, 320, 5, 5, 1280, 4500),
    (2, 80, 1, 448, 7, 7, 1536, 3500), (3, 40, 3, 160, 5, 1, 448, 5500), (4, 56, 2, 224, 7, 7, 640, 2500),
    (2, 72, 2, 288, 9, 3, 832, 4200), (3, 24, 5, 352, 11, 11, 1152, 3300), (2, 112, 1, 416, 13, 13, 960, 4800),
    (4, 64, 1, 96, 3, 1, 288, 2000), (3, 88, 2, 480, 15, 5, 1408, 3900),
    # more points than terms (28 with L*t*kv*d and t*kv*d): the fit must stay overdetermined
    (3, 72, 3, 256, 16, 4, 736, 3100), (2, 40, 2, 320, 10, 10, 896, 2700),
    (4, 48, 2, 192, 12, 6, 544, 4400), (3, 56, 1, 352, 8, 8, 1056, 3600),
]


def model(family: str, L: int, h: int, a: int, kv: int, f: int, V: int) -> ModelSpec:
    llama = family == "llama"
    return ModelSpec(
        name=f"design-{family}", family=family, layers=L, hidden=h, heads=a, kv_heads=kv if llama else a,
        ffn=f, vocab=V, max_positions=4096, norm="rmsnorm" if llama else "layernorm",
        mlp="swiglu" if llama else "gelu", position="rope" if llama else "learned",
        qkv_bias=not llama, out_bias=not llama, mlp_bias=not llama, tied_embeddings=not llama,
        type_vocab=2 if family == "bert" else 0, pooler=family == "bert")


def observe(family: str, precision: str, wl: str, recompute: str, attention: str, point,
            rank: int) -> dict:
    """The activation bytes of each quantity for one design point."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    L, s, b, h, a, kv, f, V = point
    dtype, mode = PRECISIONS[precision]
    kbit = {"quant": "nf4", "kbit_prepare": True} if precision in KBIT else {}
    w = (workload_spec("lora", lora_rank=rank, lora_targets=lora_targets(family, wl.split("-")[1]), **kbit)
         if wl.startswith("lora") else workload_spec(wl))
    spec = job_spec(model(family, L, h, a, kv, f, V), wl=w, seq=s, batch=b, dtype=dtype,
                    precision=mode, recompute=recompute, attention=attention)
    with cuda_policy(), FakeTensorMode(), StorageTracker() as tracker:  # GPU autocast (measure/autocast.py)
        prepared = prepare(spec, "cpu", tracker, last_decode_only=True)
        prepared.step()
        tracker.reset_peak()
        prepared.step()
    c = Columns.from_specs([spec])
    # the eager masks a checkpoint holds are a term of their own (detailed.held_mask_bytes)
    saved = tracker.marks["after_forward"]["activations"] - int(held_mask_bytes(c)[0])
    return {"saved": saved}, list(basis_values(c)[0])


def solve(rows: list[list[float]], ys: list[int]) -> list[int] | None:
    A, y = np.array(rows, dtype=float), np.array(ys, dtype=float)
    for j in range(A.shape[1]):  # a term equal to an earlier one on every point (gpt2 and bert have no
        if any(np.array_equal(A[:, i], A[:, j]) for i in range(j)):  # GQA: L*t*kv*d is L*t*h) adds nothing
            A[:, j] = 0.0
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    exact = np.round(coef * 4) / 4  # bytes per term are multiples of 1/4 (int4 is not measured)
    return [float(v) for v in exact] if np.abs(A @ exact - y).max() == 0 else None


def modes():
    for mode in itertools.product(FAMILIES, PRECISIONS, WORKLOADS, RECOMPUTES, ATTENTIONS):
        if not (mode[1] in KBIT and mode[2] == "train"):
            yield mode


def observe_mode(mode: tuple[str, ...]) -> tuple[tuple[str, ...], list, dict]:
    rows, obs = [], {}
    for i, point in enumerate(DESIGN):  # (gpt2 and bert ignore kv: model() uses kv = heads)
        o, row = observe(*mode, point, LORA_RANKS[i % 2])
        rows.append(row)
        for k, v in o.items():
            obs.setdefault(k, []).append(v)
    return mode, rows, obs


# the terms a mode without an exact fit may add to its exact neighbour's: per-layer activations,
# adapters and per-token terms (a free fit of all 28 terms reproduces the small design but
# extrapolates badly: a tiny model at seq 8192 came out 16 % high)
DELTA_TERMS = ("Lth", "Ltkv", "Ltf", "Lt", "Ltr", "Llora", "Lbas2", "bas2", "th", "tf", "t", "one")  # Lbas2, bas2: a 16-bit eager softmax is fp32 under autocast


def least_squares(rows: list[list[float]], ys: list[int], base: list[float] | None) -> tuple[list[float], float]:
    """A mode with no exact fit: its exact neighbour's coefficients (`base`: mixed LoRA from pure
    16-bit LoRA, which saves the same tensors but autocast's and peft's 16-bit copies) plus a
    least-squares delta on DELTA_TERMS; without a neighbour a free least-squares fit. Returns the
    coefficients and the worst relative residual on the design."""
    A, y = np.array(rows, dtype=float), np.array(ys, dtype=float)
    if base is None:
        coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    else:
        cols = [BASIS.index(n) for n in DELTA_TERMS]
        delta, *_ = np.linalg.lstsq(A[:, cols], y - A @ np.array(base), rcond=None)
        coef = np.array(base, dtype=float)
        coef[cols] += delta
    coef = np.round(coef, 4)
    return [float(v) for v in coef], float(np.abs(A @ coef - y).max() / y.min())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="processes (each traces whole modes)")
    parser.add_argument("--modes", nargs="*",
                        help="refit only these family/precision/workload/recompute/attention modes, keeping the rest")
    args = parser.parse_args(argv)
    out = ROOT / "src" / "memsweep" / "formulas" / "coefficients.py"
    table: dict[str, list[float]] = {}
    approximate: dict[str, float] = {}
    todo = list(modes())
    if args.modes:
        from memsweep.formulas import coefficients as old

        # the kept modes' coefficients by term name (a term the basis gained is 0 in them)
        table = {k: [dict(zip(old.BASIS, v)).get(n, 0.0) for n in BASIS] for k, v in old.COEFFICIENTS.items()}
        approximate = dict(getattr(old, "APPROXIMATE", {}))
        todo = [m for m in todo if "/".join(m) in args.modes]
    # a mode without an exact fit starts from its neighbour without autocast: fit those first
    # (and a k-bit-prepared mode from the mixed one of the same trace design: those before it)
    todo.sort(key=lambda m: {"mixed": 1, "kbit": 2}.get(m[1], 0))
    observed: dict[str, list[int]] = {}
    with Pool(args.jobs) as pool:
        for mode, rows, obs in pool.imap(observe_mode, todo):
            for quantity, ys in obs.items():
                key = "/".join((*mode, quantity))
                observed[key] = ys
                coef = solve(rows, ys)
                approximate.pop(key, None)
                if coef is None and "/kbit/" in key and key.replace("/kbit/", "/mixed/") in observed:
                    # the k-bit-prepared step is the mixed one plus fp32 casts: the difference of the
                    # two traces is exact, so the mode is its neighbour's fit plus that difference
                    plain = key.replace("/kbit/", "/mixed/")
                    delta = solve(rows, [a - b for a, b in zip(ys, observed[plain])])
                    if delta is not None:
                        coef = [a + b for a, b in zip(table[plain], delta)]
                        if plain in approximate:
                            approximate[key] = approximate[plain]
                        print(f"{key}: {plain} + {dict((n, v) for n, v in zip(BASIS, delta) if v)}", flush=True)
                        table[key] = coef
                        continue
                if coef is None:
                    neighbour = key.replace("/mixed/", "/pure16/") if "/mixed/lora" in key else None
                    base = table.get(neighbour) if neighbour and neighbour not in approximate else None
                    coef, worst = least_squares(rows, ys, base)
                    approximate[key] = worst
                    print(f"NOT EXACT {key}: least squares, worst residual {worst:.2e}", flush=True)
                else:
                    print(f"{key}: {dict((n, v) for n, v in zip(BASIS, coef) if v)}", flush=True)
                table[key] = coef
    lines = [
        '"""Generated by scripts/derive_coefficients.py from the reference implementation: do not edit.',
        "",
        "Bytes per structural term (BASIS) of the activations the reference PyTorch step holds, per",
        "mode family/precision/workload/recompute/attention/quantity. See docs/formulas.md.",
        "Exact fits (every design point to the byte) but the modes in APPROXIMATE: least-squares",
        "fits, with their worst relative residual on the design.",
        '"""',
        "",
        f"BASIS = {BASIS!r}",
        "",
        "COEFFICIENTS: dict[str, tuple[float, ...]] = {",
        *[f"    {k!r}: {tuple(v)!r}," for k, v in table.items()],
        "}",
        "",
        "APPROXIMATE: dict[str, float] = {",
        *[f"    {k!r}: {v:.3g}," for k, v in approximate.items()],
        "}",
        "",
    ]
    out.write_text("\n".join(lines))
    print(f"{len(table) - len(approximate)} exact fits and {len(approximate)} least-squares fits written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
