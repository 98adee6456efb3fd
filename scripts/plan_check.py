"""The planner's multi-GPU answers against one traced rank of the layout they name.

    python scripts/plan_check.py [--layers 2]

For each question (the five of issue 26: 70B full training, 70B QLoRA on 24 GB cards, Mixtral
LoRA, 405B training, a 32k-context run), the planner's top answer (`plan.ask`) gives a layout and a
recompute. That layout is traced with `measure=fake` (measure/parallel.py: one rank under a fake
process group) on the same model cut to `--layers` blocks, the same seq and batch, and compared
phase by phase with `detailed` for that same cut model: the planner's answer rests on `detailed`'s
per-rank terms, which the cut model exercises at the answer's widths, vocabulary and layout (the
full-depth rank differs only in how many blocks it repeats). A layout not traced yet (pipeline
stages, QLoRA or MoE under tensor parallel) says why. docs/parallel.md keeps the output.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memsweep.measure.backends import measure  # noqa: E402
from memsweep.plan.ask import _rank1, parse_args  # noqa: E402
from memsweep.presets import job_spec, model_spec  # noqa: E402
from memsweep.specs import MeasureSpec, Parallel  # noqa: E402
from parallel_accuracy import errors  # noqa: E402  (scripts/: detailed vs a trace, per phase)

QUESTIONS = (
    "model=llama2-70b hardware=h100-80g workload=train seq=2048",
    "model=llama2-70b hardware=rtx4090-24g workload=qlora seq=2048",
    "model=mixtral-8x7b hardware=h100-80g workload=lora seq=4096",
    "model=llama3.1-405b hardware=h100-80g workload=train seq=4096",
    "model=llama3-8b hardware=h100-80g workload=train seq=32768 rope_scaling=4 sequence_parallel=true",
)


def check(question: str, layers: int) -> str:
    spec = parse_args(question.split())
    _, r = _rank1(spec)
    if r["status"] != "ok":
        return f"| {question} | {r['status']}: {r['reason']} | | | |"
    tp = int(r["tp"])
    par = Parallel("answer", tp=tp, pp=int(r["pp"]), dp=int(r["dp"]), zero=int(r["zero"]), ep=int(r.get("ep") or 1),
                   sequence_parallel=spec.sequence_parallel and tp > 1 and int(r["seq"]) % tp == 0)
    layout = (f"{int(r['gpus'])} GPUs: tp{par.tp}{' sp' if par.sequence_parallel else ''} pp{par.pp} dp{par.dp} "
              f"zero{par.zero}, recompute={r['recompute']}")
    full = f"{r['total_gib']:.1f} of {r['capacity_bytes'] / 2**30:.1f}"
    if par.pp > 1:
        return f"| {question} | {layout} | {full} | not traced: pipeline stages are analytic | |"
    model = model_spec(r["model"], layers=layers)
    job = job_spec(model, wl=r["workload"], seq=int(r["seq"]), batch=int(r["batch"]), recompute=r["recompute"],
                   parallel=par, measure=MeasureSpec("fake", "fake"))
    started = time.perf_counter()
    m = measure(job)
    took = time.perf_counter() - started
    if m.status != "ok":
        return f"| {question} | {layout} | {full} | {m.status}: {m.error} | |"
    errs = " / ".join(f"{e:+.2f}" for e in errors(job, m)[1])
    return f"| {question} | {layout} | {full} | {m.peak_bytes / 2**30:.3f} in {took:.1f} s | {errs} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="blocks of the traced model")
    args = ap.parse_args(argv)
    print(f"| question (`plan.py ask`) | the answer | its GiB per GPU (of capacity) | traced rank, {args.layers} blocks: "
          "GiB | detailed vs trace, forward / backward / optimizer % |")
    print("|---|---|---|---|---|")
    for q in QUESTIONS:
        print(check(q, args.layers), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
