"""The time model against published throughput: every entry of docs/data/published_throughput.yaml
that memsweep can rebuild, estimated uncalibrated, and how far it lands.

    python scripts/validate_time.py                      # prints the table, writes docs/time-validation.md
    python scripts/validate_time.py --out /tmp/v.md

An entry is rebuilt as a JobSpec: its model and hardware presets, tp / pp / dp, seq, the
micro-batch (1 where the source does not say), gradient accumulation = global batch / (dp x
micro-batch), its recompute (none where not stated) and dtype (bf16 where not stated). The ZeRO
stage follows the framework the source used (ZERO_OF). Entries memsweep cannot rebuild — FP8
matmuls, context parallelism, a model or GPU without a preset, a serving batch the source does
not give — are listed with the reason, never dropped.

Metrics compared: `mfu` (executed model FLOPs without recompute / time / peak), `hfu` and
`tflops_per_gpu` (with recompute: hardware FLOPs), `tokens_per_s_per_gpu`, `step_time_s`, and
`peak_memory_gb` (detailed's total, against the reported peak). Ratio = estimate / published.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import yaml  # noqa: E402

from memsweep.columns import Columns  # noqa: E402
from memsweep.errors import ConfigError  # noqa: E402
from memsweep.formulas import get_formula  # noqa: E402
from memsweep.formulas.timing import Speeds, step_time  # noqa: E402
from memsweep.presets import job_spec, model_spec, preset_names, workload_spec  # noqa: E402
from memsweep.results import write_text_atomic  # noqa: E402
from memsweep.specs import Parallel  # noqa: E402

DATA = ROOT / "docs" / "data" / "published_throughput.yaml"
OUT = ROOT / "docs" / "time-validation.md"

ZERO_OF = (("torchtitan", 3), ("MosaicML", 3), ("llm-foundry", 3), ("Llama 3 Herd", 2), ("Qwen", 0))
"""The data-parallel sharding each framework ran (the entries' sources): torchtitan and
llm-foundry shard with FSDP (ZeRO-3); Llama 3 shards optimizer states and gradients, keeping the
parameters after the forward (ZeRO-2, the paper's sec. 3.3.2); Megatron-LM's distributed optimizer
is ZeRO-1 (the default here); a single-GPU run has none."""


def zero_of(source: str, dp: int) -> int:
    if dp <= 1:
        return 0
    return next((z for key, z in ZERO_OF if key in source), 1)


def model_of(e: dict):
    """The entry's model: a preset, or its `shape` (a base preset with the fields that differ)."""
    if e.get("model") is not None:
        return e["model"]
    shape = dict(e.get("shape") or {})
    if not shape:
        return None
    return dataclasses.replace(model_spec(shape.pop("base")), name=e["id"], **shape)


def rebuild(e: dict):
    """The entry as a JobSpec, or the reason it cannot be one."""
    model = model_of(e)
    if model is None or e.get("hardware") is None:
        return None, "no memsweep preset (or shape) for its model or GPU"
    if e.get("dtype") == "fp8":
        return None, "FP8 matmuls: memsweep's dtypes compute in 16 or 32 bits"
    if (e.get("cp") or 1) > 1:
        return None, "context parallelism is not modelled"
    if e["kind"] != "train" and e.get("micro_batch") is None:
        return None, "the serving batch is not published"
    tp, pp, dp = (int(e.get(k) or 1) for k in ("tp", "pp", "dp"))
    micro = int(e.get("micro_batch") or 1)
    glob = e.get("global_batch")
    accum = max(1, int(glob) // (dp * micro)) if glob else 1
    wl = workload_spec(e.get("workload") or ("train" if e["kind"] == "train" else "inference"))
    if e.get("quant"):  # the frozen base's format (Qwen's Q-LoRA: GPTQ int4)
        wl = dataclasses.replace(wl, quant=e["quant"])
    try:
        spec = job_spec(model, wl=wl, hardware=e["hardware"], seq=int(e["seq"]), batch=micro,
                        dtype=e.get("dtype") or "bf16", recompute=e.get("recompute") or "none",
                        parallel=Parallel("published", tp=tp, pp=pp, dp=dp, zero=zero_of(e["source"], dp),
                                          sequence_parallel=bool(e.get("sequence_parallel"))),
                        grad_accum=accum)
    except ConfigError as exc:
        return None, f"not a valid memsweep job: {exc}"
    return spec, None


def estimate(spec, metric: str) -> float | None:
    cols = Columns.from_specs([spec])
    t = step_time(cols, Speeds.of([spec.hardware], [spec.dtype]))
    peak = Speeds.of([spec.hardware], [spec.dtype]).flops[0]
    if metric == "mfu":
        return float(t.mfu[0])
    if metric in ("hfu", "tflops_per_gpu"):
        hfu = float(t.flops[0] / t.step_s[0] / peak)
        return hfu if metric == "hfu" else hfu * peak / 1e12
    if metric == "tokens_per_s_per_gpu":
        return float(t.tokens_per_s[0])
    if metric == "step_time_s":
        return float(t.step_s[0])
    if metric == "peak_memory_gb":
        return float(get_formula("detailed")(cols).total[0]) / 1e9
    return None


def speed_ratio(metric: str, published: float, est: float) -> float:
    """Above 1: the estimate is faster (or uses the GPU more) than the run was, or, for memory,
    larger: estimate / published, inverted for a time."""
    return published / est if metric == "step_time_s" else est / published


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"the Markdown report (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    entries = yaml.safe_load(DATA.read_text())
    models, hardware = set(preset_names("model")), set(preset_names("hardware"))
    rows, skipped = [], []
    for e in entries:
        if e.get("model") not in models | {None} or e.get("hardware") not in hardware | {None}:
            skipped.append((e, "names a preset that does not exist"))
            continue
        spec, why = rebuild(e)
        metrics = [(e["metric"], e["value"]), *((e.get("also") or {}).items())]
        if spec is None:
            skipped.append((e, why))
            continue
        for metric, value in metrics:
            est = estimate(spec, metric)
            if est is None or value is None:
                continue
            rows.append((e, spec, metric, float(value), est, speed_ratio(metric, float(value), est)))
    lines = ["# The time model against published throughput", "",
             "`python scripts/validate_time.py`: every entry of `docs/data/published_throughput.yaml` memsweep can "
             "rebuild, estimated with the **uncalibrated** time model (`formulas/timing.py`: compute efficiency "
             "0.7, memory 0.8, communication 0.75, data-parallel collectives hidden under compute). Ratio: the "
             "estimated speed over the published one (throughput, MFU: estimate / published; step time: "
             "published / estimate), so above 1 the estimate is optimistic; for peak memory, estimate / published.", "",
             "| entry | model | hardware | layout | seq | micro × accum | recompute | metric | published | estimate | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e, spec, metric, value, est, ratio in rows:
        p = spec.parallel
        lines.append(f"| {e['id']} | {spec.model.name} | {spec.hardware.name} | tp{p.tp} pp{p.pp} dp{p.dp} zero{p.zero} | "
                     f"{spec.seq:,} | {spec.batch} × {spec.grad_accum} | {spec.recompute} | {metric} | {value:.4g} | "
                     f"{est:.4g} | {ratio:.2f} |")
    time_rows = [r for r in rows if r[2] != "peak_memory_gb"]
    if time_rows:
        ratios = sorted(r[-1] for r in time_rows)
        median = ratios[len(ratios) // 2]
        lines += ["", f"{len(time_rows)} time comparisons: median ratio {median:.2f}, range {ratios[0]:.2f} to "
                      f"{ratios[-1]:.2f}."]
    lines += ["", "Not rebuilt:", ""]
    lines += [f"- {e['id']}: {why}" for e, why in skipped]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text_atomic(text, args.out)
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
