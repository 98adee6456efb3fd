"""Published training runs that ran (issue 30), estimated by `detailed` with the stack's kernels
and without them: a run that ran must fit; a memory figure the run published is compared.

    python scripts/published_runs.py            # the table docs/kernels.md shows (a second or two)

Each run cites its source; a value the source does not state is marked (inferred) with where it
comes from. `fits` is memsweep's: total <= (memory - reserve) x (1 - margin), margin 0.05.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from memsweep.estimate import capacity_bytes  # noqa: E402
from memsweep.columns import Columns  # noqa: E402
from memsweep.formulas import FORMULAS  # noqa: E402
from memsweep.presets import job_spec, load_preset, model_spec  # noqa: E402
from memsweep.specs import Hardware, KernelsSpec, Parallel  # noqa: E402

GIB = 2**30
KERNELS = {name: KernelsSpec(**load_preset("kernels", name)) for name in ("eager", "liger", "flash_attn", "te", "compile")}
H100_96 = dataclasses.replace(Hardware(**load_preset("hardware", "h100-80g")), name="h100-96g", memory_mib=97871)
"""torchtitan's benchmark H100s are the 96 GB HBM2e part (its docs/performance.md)."""


def fsdp(dp: int) -> Parallel:
    return Parallel(name=f"fsdp{dp}", dp=dp, zero=3)


TINYLLAMA = dataclasses.replace(model_spec("llama2-7b"), name="tinyllama-1.1b", layers=22, hidden=2048, heads=32,
                                kv_heads=4, ffn=5632, vocab=32000, max_positions=2048)
"""TinyLlama README: 'Layers: 22, Heads: 32, Query Groups: 4, Embedding Size: 2048, Intermediate
Size (Swiglu): 5632'; vocab 32000 (the Llama-2 tokenizer)."""
OLMO_LLAMA8B = dataclasses.replace(model_spec("llama3-8b"), name="olmo-core-llama3-8b", vocab=100352)
"""OLMo-core's Llama3-8B.py: the Llama-3-8B shape with the OLMo tokenizer's 100352 rows."""

# (source, model, job settings, the stack's kernels, what was published: GiB or None (ran))
RUNS = [
    ("torchtune README, 'Optimization flags': + Packed Dataset (Llama 3.2 3B, A100, bs 2, 4096, bf16)",
     "llama3.2-3b", dict(seq=4096, batch=2, precision="pure", hardware="a100-80g"), "eager", 60.0),
    ("torchtune README, 'Optimization flags': + Compile", "llama3.2-3b",
     dict(seq=4096, batch=2, precision="pure", hardware="a100-80g"), "compile", 51.0),
    ("torchtitan docs/performance.md Table 1: FSDP, Llama 3.1 8B, 8 GPUs, local bs 2, selective AC (reserved)",
     "llama3-8b", dict(seq=8192, batch=2, precision="mixed", mixed_policy="param_dtype", recompute="selective",
                       hardware=H100_96, parallel=fsdp(8)), "eager", 82.4),
    ("torchtitan Table 1: FSDP + torch.compile", "llama3-8b",
     dict(seq=8192, batch=2, precision="mixed", mixed_policy="param_dtype", recompute="selective",
          hardware=H100_96, parallel=fsdp(8)), "compile", 77.0),
    ("TinyLlama README: 16 A100-40G, micro-batch 8 x 2048, FSDP, no checkpointing, flash-attn's fused kernels",
     TINYLLAMA, dict(seq=2048, batch=8, precision="mixed", mixed_policy="param_dtype", hardware="a100-40g",
                     parallel=fsdp(16)), "flash_attn", None),
    ("Liger-Kernel examples/huggingface README: LLaMA 3-8B, Alpaca (max 512), bs 64 per GPU, FSDP1 on 4 A100s "
     "(80 GB, inferred), checkpointing, bf16, AdamW: 'GPU memory usage drops by 40%'; plain HF ran out of memory at 64",
     "llama3-8b", dict(seq=512, batch=64, precision="mixed", mixed_policy="param_dtype", recompute="full",
                       hardware="a100-80g", parallel=fsdp(4)), "liger", None),
    ("OLMo-core README / Llama3-8B.py: rank micro-batch 2 x 4096, HSDP (8 per node), compile, no AC, H100",
     OLMO_LLAMA8B, dict(seq=4096, batch=2, precision="mixed", mixed_policy="param_dtype", hardware="h100-80g",
                        parallel=fsdp(8)), "compile", None),
]


def estimate(model, settings: dict, kernels: str) -> tuple[float, float]:
    """(total GiB per GPU, capacity GiB) of `detailed` for the run with `kernels`."""
    kw = dict(settings)
    spec = job_spec(model if not isinstance(model, str) else model_spec(model), wl="train",
                    kernels=KERNELS[kernels], **kw)
    total = float(FORMULAS["detailed"](Columns.from_specs([spec])).total[0])
    return total / GIB, capacity_bytes(spec) / GIB


def main() -> int:
    print("| run (source) | kernels | published GiB | detailed, eager | detailed, the stack's | fits (stack) |")
    print("|---|---|---|---|---|---|")
    for source, model, settings, kernels, published in RUNS:
        eager, cap = estimate(model, settings, "eager")
        stack, _ = estimate(model, settings, kernels)
        pub = f"{published:.1f}" if published is not None else "ran"
        fits = "yes" if stack <= cap else f"**no** (capacity {cap:.1f})"
        err = f" ({(stack / published - 1) * 100:+.1f} %)" if published is not None else ""
        print(f"| {source} | {kernels} | {pub} | {eager:.1f} | {stack:.1f}{err} | {fits} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
