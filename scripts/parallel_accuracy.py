"""detailed vs one traced rank of a data-parallel job (DDP / FSDP2 under a fake process group), per phase.

    python scripts/parallel_accuracy.py [--models llama3-8b,mixtral-8x7b] [--layers 4] [--seq 1024] [--dp 8] [--layouts zero1,zero2,zero3,tp2,tp8_sp]
    python scripts/parallel_accuracy.py --random 60 --seed 0


Every combination of workload (train, lora) x precision (mixed autocast, pure, mixed with
FSDP2's param_dtype, ZeRO-2 / 3 only) x layout (`--layouts`: zero1 is DDP + ZeroRedundancyOptimizer,
zero2 / zero3 FSDP2, tpN / tpN_sp DTensor's tensor / sequence parallel) x recompute (none, full) is measured with `measure=fake` (measure/parallel.py) and
estimated with `detailed`; the table gives the error of the total and of each phase's peak (+:
detailed above the trace), then the worst and the median. `--random N` draws N layouts instead
from every dense preset (cut to 2-4 layers), train / lora, the three precisions, ZeRO 0-3 over dp 2-16 or tensor parallel 2-8 (half with sequence parallel), recompute none / full, sdpa / eager, AdamW / SGD, batch 1-3 and
a sequence of 100-3000 tokens (not a power of two), and measures with the reference models or,
one draw in four, transformers' (measure.impl=hf). docs/parallel.md keeps the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memsweep.columns import Columns  # noqa: E402
from memsweep.formulas.detailed import phase_peaks  # noqa: E402
from memsweep.measure.backends import measure  # noqa: E402
from memsweep.presets import job_spec, model_spec, preset_names  # noqa: E402
from memsweep.specs import MeasureSpec, Parallel  # noqa: E402

PHASES = ("forward", "backward", "optimizer")
PRECISIONS = {"mixed": {"precision": "mixed"}, "pure": {"precision": "pure"},
              "param_dtype": {"precision": "mixed", "mixed_policy": "param_dtype"}}


def errors(spec, m) -> tuple[float, list[float]]:
    """% error of detailed's total and of each training phase's peak against a measurement."""
    est = phase_peaks(Columns.from_specs([spec]))
    errs = [100 * (float(est[p][0]) - m.phase_peaks[p]) / m.phase_peaks[p] for p in PHASES]
    return 100 * (max(float(est[p][0]) for p in PHASES) - m.peak_bytes) / m.peak_bytes, errs


def grid(args):
    for name, wl, prec, lay, rc in itertools.product(args.models.split(","), ("train", "lora"), PRECISIONS,
                                                     args.layouts.split(","), ("none", "full")):
        par = layout(lay, args.dp)
        if prec == "param_dtype" and par.zero < 2:  # FSDP2's MixedPrecisionPolicy
            continue
        yield name, wl, prec, lay, rc, job_spec(
            model_spec(name, layers=args.layers), wl=wl, seq=args.seq, recompute=rc,
            parallel=par, measure="fake", **PRECISIONS[prec])


def layout(name: str, dp: int) -> Parallel:
    """zeroN: dp ranks at ZeRO stage N (0 / 1: DDP, 2 / 3: FSDP2); tpN, tpN_sp: N tensor-parallel
    ranks (DTensor), with sequence parallel; tpN+zeroK: both, on a 2-D mesh."""
    if "+" in name:
        tp, data = (layout(part, dp) for part in name.split("+"))
        return Parallel(name, tp=tp.tp, sequence_parallel=tp.sequence_parallel, dp=data.dp, zero=data.zero)
    if name.startswith("zero"):
        return Parallel(name, dp=dp, zero=int(name[4:]))
    if name.startswith("tp"):
        return Parallel(name, tp=int(name[2:].removesuffix("_sp")), sequence_parallel=name.endswith("_sp"))
    raise SystemExit(f"--layouts: {name!r} is not zeroN, tpN or tpN_sp")


def draws(args):
    rng = random.Random(args.seed)
    dense = [n for n in preset_names("model")
             if n not in ("hf", "tiny") and not model_spec(n).experts and model_spec(n).decoder]
    made = 0
    while made < args.random:
        name, wl, prec = rng.choice(dense), rng.choice(("train", "lora")), rng.choice(list(PRECISIONS))
        lay, rc = rng.choice(("zero0", "zero1", "zero2", "zero3", "tp", "tp")), rng.choice(("none", "full"))
        if lay == "tp":
            m = model_spec(name)
            sizes = [t for t in (2, 4, 8) if m.heads % t == 0 and m.kv_heads % t == 0]
            if not sizes:
                continue
            par = layout(f"tp{rng.choice(sizes)}" + ("_sp" if rng.random() < 0.5 else ""), 1)
            impl = "reference"  # (tensor parallel is traced on the reference models)
        else:
            par = layout(lay, rng.choice((2, 4, 8, 16)))
            impl = "hf" if rng.random() < 0.25 else "reference"
        if prec == "param_dtype" and par.zero < 2:  # FSDP2's MixedPrecisionPolicy
            continue
        seq = rng.randrange(100, 3000)
        seq -= seq % par.tp if par.sequence_parallel else 0  # (sequence parallel splits it evenly)
        try:
            spec = job_spec(model_spec(name, layers=rng.choice((2, 3, 4))), wl=wl, seq=seq, batch=rng.randint(1, 3), recompute=rc,
                            attention=rng.choice(("sdpa", "eager")), optimizer=rng.choice(("adamw", "sgd")),
                            parallel=par, measure=MeasureSpec("fake", "fake", impl=impl), **PRECISIONS[prec])
        except ValueError:  # a combination the spec refuses (Gemma-3's pattern in 2 layers, past its positions)
            continue
        made += 1
        yield name, wl, prec, par.name, rc, spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dp", type=int, default=8)
    ap.add_argument("--layouts", default="zero1,zero2,zero3,tp2,tp8_sp",
                    help="the grid's layouts: zeroN (dp ranks; 0 / 1 DDP, 2 / 3 FSDP2), tpN, tpN_sp (DTensor), tpN+zeroK (2-D)")
    ap.add_argument("--random", type=int, default=0, help="draw this many layouts instead of the grid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--single", action="store_true",
                    help="also measure each job on one GPU (mixed_policy=param_dtype is not measured there)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    extra = (" one GPU: total % / worst phase % |", "---|") if args.single else ("", "")
    print("| model | workload | precision | layout | recompute | job | measured GiB | total % | forward % | backward % "
          f"| optimizer % |{extra[0]}")
    print(f"|---|---|---|---|---|---|---|---|---|---|---|{extra[1]}")
    totals, phases = [], []
    for name, wl, prec, lay, rc, spec in (draws(args) if args.random else grid(args)):
        m = measure(spec)
        what = (f"| {name} | {wl} | {prec} | {lay} | {rc} | dp {spec.parallel.dp} L{spec.model.layers} b{spec.batch} s{spec.seq} "
                f"{spec.attention} {spec.optimizer.name} {spec.measure.impl} |")
        if m.status != "ok":
            print(f"{what} {m.status}: {m.error} | | | | |")
            continue
        total, errs = errors(spec, m)
        # the same job on one GPU: the error FSDP's terms inherit from the single-GPU estimate
        one = dataclasses.replace(spec, parallel=Parallel("single"))
        m1 = measure(one) if args.single else None
        alone = (f" {errors(one, m1)[0]:+.2f} / {max(errors(one, m1)[1], key=abs):+.2f} |"
                 if m1 is not None and m1.status == "ok" else (" |" if args.single else ""))
        totals.append(abs(total))
        phases.extend(abs(e) for e in errs)
        print(f"{what} {m.peak_bytes / 2**30:.3f} | {total:+.2f} | "
              + " | ".join(f"{e:+.2f}" for e in errs) + " |" + alone, flush=True)
    if totals:
        how = (f"random draw of {args.random}, seed {args.seed}" if args.random
               else f"dp={args.dp}, {args.layers} layers, seq {args.seq}")
        print(f"\n{len(totals)} measured in {time.perf_counter() - started:.0f} s ({how}). Total |error|: median {statistics.median(totals):.2f} %, worst {max(totals):.2f} %; "
              f"phase |error|: median {statistics.median(phases):.2f} %, worst {max(phases):.2f} %.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
