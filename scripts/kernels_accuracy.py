"""`detailed` against the fake trace for every `kernels` option (issue 30): per preset, workload,
precision and recompute, the largest per-phase error of each option, and eager's beside them.

    python scripts/kernels_accuracy.py                       # the table of docs/kernels.md
    python scripts/kernels_accuracy.py --models gpt2 --layers 2 --seq 256

Models are cut to --layers blocks (an MoE model keeps its dense ones besides), which makes the
moments inside one block weigh more than at full depth: the errors are upper bounds of the full
models' in that respect.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from memsweep.columns import Columns  # noqa: E402
from memsweep.formulas.detailed import phase_peaks  # noqa: E402
from memsweep.measure.backends import measure  # noqa: E402
from memsweep.presets import job_spec, load_preset, model_spec  # noqa: E402
from memsweep.specs import KernelsSpec, MeasureSpec  # noqa: E402

MODELS = ("llama3.2-1b", "qwen3-8b", "gemma-2-2b", "phi-3-mini", "gpt2", "falcon-7b")
MODES = ("train/mixed/none", "train/pure/none", "lora/mixed/none", "train/mixed/full", "lora/mixed/full")
OPTIONS = ("eager", "liger", "flash_attn", "te", "compile")


def worst_error(model, mode: str, option: str, seq: int, batch: int) -> str:
    wl, precision, recompute = mode.split("/")
    try:
        spec = job_spec(model, wl=wl, measure=MeasureSpec("fake", "fake"), seq=seq, batch=batch, precision=precision,
                        recompute=recompute, kernels=KernelsSpec(**load_preset("kernels", option)))
    except Exception as exc:  # a combination the config refuses
        return f"refused ({type(exc).__name__})"
    m = measure(spec)
    if m.status != "ok":
        return m.status
    est = phase_peaks(Columns.from_specs([spec]))
    errors = {p: float(est[p][0]) / v - 1 for p, v in m.phase_peaks.items() if p in est}
    phase = max(errors, key=lambda p: abs(errors[p]))
    return f"{errors[phase] * 100:+.2f} ({phase})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--options", nargs="*", default=list(OPTIONS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    print(f"{args.layers} layers, seq {args.seq}, batch {args.batch}: detailed vs measure=fake, the largest "
          "per-phase error in % (the phase)\n")
    print("| model | workload / precision / recompute | " + " | ".join(args.options) + " |")
    print("|---|---|" + "---|" * len(args.options))
    for name, mode in itertools.product(args.models, args.modes):
        m = model_spec(name)
        m = dataclasses.replace(m, layers=min(m.layers, args.layers + (m.dense_layers if m.experts else 0)))
        cells = [worst_error(m, mode, o, args.seq, args.batch) for o in args.options]
        print(f"| {name} | {mode} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
