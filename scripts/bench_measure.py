"""Benchmark the measurement backends: wall time and peak RSS per case, each in its own process.

    python scripts/bench_measure.py            # all cases
    python scripts/bench_measure.py --quick    # skip llama2-70b
    python scripts/bench_measure.py --hf       # measure.impl=hf (transformers) next to the reference

`fake` runs a full training step (two steps: the measured one has optimizer state) of models up
to 70B parameters under FakeTensorMode; `cpu` runs `tiny` for real. Figures are for this machine,
measured in this run; the ratio column compares each case's wall time with the fake llama2-7b one.
`--hf` adds the transformers models of issue 12 (goal: a 7-8B train step and inference under 10 s).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CASES = [
    # (label, backend, model, overrides)
    ("gpt2 train seq 1024", "fake", "gpt2", {"seq": 1024}),
    ("llama2-7b train seq 2048", "fake", "llama2-7b", {"seq": 2048}),
    ("llama2-7b inference 2048+128", "fake", "llama2-7b", {"seq": 2048, "wl": "inference"}),
    ("llama2-70b train seq 2048", "fake", "llama2-70b", {"seq": 2048}),
    ("tiny train seq 256 batch 4", "cpu", "tiny", {"seq": 256, "batch": 4}),
    ("tiny inference 256+128", "cpu", "tiny", {"seq": 256, "wl": "inference"}),
]
HF_CASES = [  # measure.impl=hf (the transformers model), --hf only
    ("hf llama3-8b train seq 2048", "fake", "llama3-8b", {"seq": 2048, "impl": "hf"}),
    ("hf llama3-8b train eager 2048", "fake", "llama3-8b", {"seq": 2048, "impl": "hf", "attention": "eager"}),
    ("hf llama3-8b lora seq 2048", "fake", "llama3-8b", {"seq": 2048, "impl": "hf", "wl": "lora"}),
    ("hf llama3-8b full recompute 8192", "fake", "llama3-8b", {"seq": 8192, "impl": "hf", "recompute": "full"}),
    ("hf qwen2.5-7b train seq 2048", "fake", "qwen2.5-7b", {"seq": 2048, "impl": "hf"}),
    ("hf llama3-8b inference 2048+128", "fake", "llama3-8b", {"seq": 2048, "impl": "hf", "wl": "inference"}),
    ("hf tiny train seq 256 batch 4", "cpu", "tiny", {"seq": 256, "batch": 4, "impl": "hf"}),
]


def child(label: str) -> None:
    from memsweep.measure.backends import measure
    from memsweep.presets import job_spec

    from memsweep.presets import load_preset
    from memsweep.specs import MeasureSpec

    _, backend, model, top = next(c for c in CASES + HF_CASES if c[0] == label)
    top = dict(top)
    ms = MeasureSpec(**{**load_preset("measure", backend), "impl": top.pop("impl", "reference")})
    spec = job_spec(model, measure=ms, **top)
    t0 = time.perf_counter()
    m = measure(spec)
    wall = time.perf_counter() - t0
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"status": m.status, "error": m.error, "wall_s": wall, "rss_mib": rss_mib,
                      "peak_gib": (m.peak_bytes or 0) / 2**30}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip llama2-70b")
    parser.add_argument("--hf", action="store_true", help="add the measure.impl=hf cases")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    results = {}
    for label, backend, *_ in CASES + (HF_CASES if args.hf else []):
        if args.quick and "70b" in label:
            continue
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", label], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        r["process_s"] = time.perf_counter() - t0  # includes importing torch
        results[label] = (backend, r)
    ref = results["llama2-7b train seq 2048"][1]["wall_s"]
    print(f"{'case':34s} {'backend':7s} {'status':7s} {'peak GiB':>9s} {'measure s':>9s} "
          f"{'process s':>9s} {'RSS MiB':>8s} {'vs 7B':>6s}")
    for label, (backend, r) in results.items():
        print(f"{label:34s} {backend:7s} {r['status']:7s} {r['peak_gib']:9.2f} {r['wall_s']:9.2f} "
              f"{r['process_s']:9.2f} {r['rss_mib']:8.0f} {r['wall_s'] / ref:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
