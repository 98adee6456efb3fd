"""detailed vs one traced rank of a data-parallel job (FSDP2 under a fake process group), per phase.

    python scripts/parallel_accuracy.py [--models llama3-8b,mixtral-8x7b] [--layers 4] [--seq 1024] [--dp 8]

Every combination of workload (train, lora) x precision (mixed autocast, pure, mixed with
FSDP2's param_dtype) x ZeRO stage (2, 3) x recompute (none, full) is measured with `measure=fake`
(measure/parallel.py) and estimated with `detailed`; the table gives the error of the total and of
each phase's peak (+: detailed above the trace), then the worst and the median. docs/parallel.md
keeps its output.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memsweep.columns import Columns  # noqa: E402
from memsweep.formulas.detailed import phase_peaks  # noqa: E402
from memsweep.measure.backends import measure  # noqa: E402
from memsweep.presets import job_spec, model_spec  # noqa: E402
from memsweep.specs import MeasureSpec, Parallel  # noqa: E402

PHASES = ("forward", "backward", "optimizer")
PRECISIONS = {"mixed": {"precision": "mixed"}, "pure": {"precision": "pure"},
              "param_dtype": {"precision": "mixed", "mixed_policy": "param_dtype"}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dp", type=int, default=8)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    print("| model | workload | precision | zero | recompute | measured GiB | total % | forward % | backward % | optimizer % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    totals, phases = [], []
    for name, wl, prec, zero, rc in itertools.product(args.models.split(","), ("train", "lora"), PRECISIONS,
                                                      (3, 2), ("none", "full")):
        spec = job_spec(model_spec(name, layers=args.layers), wl=wl, seq=args.seq, recompute=rc,
                        parallel=Parallel(f"zero{zero}", dp=args.dp, zero=zero),
                        measure="fake", **PRECISIONS[prec])
        m = measure(spec)
        if m.status != "ok":
            print(f"| {name} | {wl} | {prec} | {zero} | {rc} | {m.status}: {m.error} | | | | |")
            continue
        est = phase_peaks(Columns.from_specs([spec]))
        errs = [100 * (float(est[p][0]) - m.phase_peaks[p]) / m.phase_peaks[p] for p in PHASES]
        total = 100 * (max(float(est[p][0]) for p in PHASES) - m.peak_bytes) / m.peak_bytes
        totals.append(abs(total))
        phases.extend(abs(e) for e in errs)
        print(f"| {name} | {wl} | {prec} | {zero} | {rc} | {m.peak_bytes / 2**30:.3f} | {total:+.2f} | "
              + " | ".join(f"{e:+.2f}" for e in errs) + " |", flush=True)
    if totals:
        print(f"\n{len(totals)} measured in {time.perf_counter() - started:.0f} s (dp={args.dp}, {args.layers} layers, "
              f"seq {args.seq}). Total |error|: median {statistics.median(totals):.2f} %, worst {max(totals):.2f} %; "
              f"phase |error|: median {statistics.median(phases):.2f} %, worst {max(phases):.2f} %.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
