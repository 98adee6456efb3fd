"""The time model against llm-foundry's MPT benchmark tables (issue 28's calibration data): every
bf16 row of docs/data/llm_foundry_runs.yaml, estimated as scripts/published_runs.py maps it (MPT as
GPT-2-style blocks, flash-attn's fused loss and norm, FSDP over the row's GPUs, its micro-batch,
gradient accumulation and checkpointing), against its published tokens/s per GPU.

    python scripts/llm_foundry_time.py          # the tables docs/time.md shows (a few seconds)

Ratio = estimated / published tokens per second per GPU (above 1: the estimate is optimistic).
The uncalibrated time model (formulas/timing.py); nothing is fitted here.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from published_runs import LLM_FOUNDRY_KERNELS, llm_foundry_runs, run_spec  # noqa: E402

from memsweep.estimate import estimate_rows  # noqa: E402
from memsweep.formulas import FORMULAS  # noqa: E402


def ratios() -> list[tuple[float, dict]]:
    """(estimated / published tokens/s per GPU, the row) for every bf16 row with a throughput."""
    out = []
    for run, model, settings in llm_foundry_runs():
        if not run.get("throughput_tokens_per_s_per_gpu"):
            continue
        est = estimate_rows(run_spec(model, settings, LLM_FOUNDRY_KERNELS), [FORMULAS["detailed"]])[0].get("est_tokens_per_s")
        if est:
            out.append((est / run["throughput_tokens_per_s_per_gpu"], run))
    return out


def summary(label: str, values: list[float]) -> str:
    geo = math.exp(statistics.mean(abs(math.log(v)) for v in values))
    return (f"| {label} | {len(values)} | {statistics.median(values):.2f} | {geo:.2f}x | "
            f"{min(values):.2f} - {max(values):.2f} |")


def main() -> int:
    rows = ratios()
    print("| group | rows | median ratio | geo-mean of abs(log ratio) | range |")
    print("|---|---|---|---|---|")
    print(summary("all", [r for r, _ in rows]))
    groups: dict[str, list[float]] = {}
    for r, run in rows:
        nodes = "one node" if run["gpus"] <= 8 else "many nodes"
        seq = "<= 2k" if run["seq"] <= 2048 else ("4-8k" if run["seq"] <= 8192 else ">= 16k")
        for key in (f"gpu {run['gpu']}", nodes, f"seq {seq}", f"model {run['model']}",
                    f"checkpointing {run['activation_checkpointing']}"):
            groups.setdefault(key, []).append(r)
    for key in sorted(groups):
        print(summary(key, groups[key]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
