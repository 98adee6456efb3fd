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
KERNELS["compile_blocks"] = dataclasses.replace(KERNELS["compile"], name="compile_blocks", compile_loss=False)
"""torchtitan's apply_compile (torchtitan/parallelisms/parallelize_llama.py, 2024): each TransformerBlock
compiled, its loss (`cross_entropy(pred.flatten(0, 1).float(), ...)`) eager: kernels.compile_loss=false."""
H100_96 = dataclasses.replace(Hardware(**load_preset("hardware", "h100-80g")), name="h100-96g", memory_mib=97871)
"""torchtitan's benchmark H100s are the 96 GB HBM2e part (its docs/performance.md)."""


def fsdp(dp: int) -> Parallel:
    return Parallel(name=f"fsdp{dp}", dp=dp, zero=3)


def torchtitan_8b(dp: int) -> dict:
    """torchtitan's Llama 3.1 8B benchmark (docs/performance.md, Tables 1 and 3): local batch 2 x
    8192, FSDP2 with bf16 parameters and fp32 reduce, per-op selective checkpointing, 96 GB H100s."""
    return dict(seq=8192, batch=2, precision="mixed", mixed_policy="param_dtype", recompute="op",
                hardware=H100_96, parallel=fsdp(dp))


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
    ("torchtitan docs/performance.md Table 1: FSDP, Llama 3.1 8B, 8 GPUs, local bs 2, selective (per-op) AC (reserved)",
     "llama3-8b", torchtitan_8b(8), "eager", 82.4),
    ("torchtitan Table 1: FSDP + torch.compile (each block; the loss eager)", "llama3-8b", torchtitan_8b(8),
     "compile_blocks", 77.0),
    ("torchtitan Table 3: FSDP, Llama 3.1 8B, 128 GPUs, local bs 2, selective (per-op) AC (reserved)",
     "llama3-8b", torchtitan_8b(128), "eager", 67.0),
    ("torchtitan Table 3: FSDP + torch.compile (each block; the loss eager)", "llama3-8b", torchtitan_8b(128),
     "compile_blocks", 62.0),
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


def run_spec(model, settings: dict, kernels):
    """The run's training JobSpec with `kernels` (a name or a spec)."""
    return job_spec(model if not isinstance(model, str) else model_spec(model), wl="train",
                    kernels=KERNELS[kernels] if isinstance(kernels, str) else kernels, **settings)


def estimate(model, settings: dict, kernels) -> tuple[float, float]:
    """(total GiB per GPU, capacity GiB) of `detailed` for the run with `kernels` (a name or a spec)."""
    spec = run_spec(model, settings, kernels)
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
    print()
    llm_foundry()
    return 0


LLM_FOUNDRY_KERNELS = KERNELS["flash_attn"]
"""llm-foundry's MPT as its benchmark ran it (docs/data/llm_foundry_runs.yaml `settings`): flash-attn's
fused cross-entropy (loss_fn fused_crossentropy), low_precision_layernorm (F.layer_norm in bf16: the
input and its statistics saved, as a fused norm), triton flash attention (SDPA), and nn.GELU: one
ATen kernel saving its input, which for memsweep's GPT-2-style blocks (a written-out gelu_new
otherwise) is `kernels.mlp=fused`."""


MPT_EAGER = dataclasses.replace(KERNELS["eager"], mlp="fused")
"""Without flash-attn's kernels: torch's cross-entropy and LayerNorm, nn.GELU still one kernel."""


def mpt(spec: dict, seq: int):
    """An MPT size as GPT-2-style blocks: learned positions (max_seq_len = the run's seq), biases,
    LayerNorm, a 4x GELU MLP (nn.GELU, one kernel), tied embeddings, no dropout."""
    return dataclasses.replace(model_spec("gpt2"), name="mpt", hidden=spec["d_model"], heads=spec["n_heads"],
                               kv_heads=spec["n_heads"], layers=spec["n_layers"],
                               ffn=spec["expansion_ratio"] * spec["d_model"], vocab=spec["vocab_size"],
                               max_positions=seq, activation="fused", attention_dropout=0.0, hidden_dropout=0.0,
                               embedding_dropout=0.0)


def llm_foundry() -> None:
    """Every row of llm-foundry's MPT benchmark tables that memsweep can express (bf16; the FP8
    rows' TransformerEngine linears are not modelled): per table, how many fit with the stack's
    kernels and without, and the largest estimate against the capacity."""
    by_table = llm_foundry_ratios()
    print("llm-foundry's MPT benchmark tables (docs/data/llm_foundry_runs.yaml; bf16 rows), `detailed` "
          "over memsweep's capacity (fits at <= 1):\n")
    print("| table | rows | fit, stack's kernels | fit, eager | largest ratio (stack) | median ratio (stack) | its row |")
    print("|---|---|---|---|---|---|---|")
    for table, rows in by_table.items():
        ratios = sorted(r[0] for r in rows)
        worst = max(rows, key=lambda r: r[0])
        w = worst[2]
        print(f"| {table} | {len(rows)} | {sum(r[0] <= 1 for r in rows)} | {sum(r[1] <= 1 for r in rows)} | "
              f"{worst[0]:.2f} | {ratios[len(ratios) // 2]:.2f} | {w['model']} seq {w['seq']} mb {w['micro_batch']} on "
              f"{w['gpus']} {w['gpu']}, AC {w['activation_checkpointing']} |")


def llm_foundry_runs() -> list[tuple[dict, object, dict]]:
    """(the row, its MPT model, its job settings) for every bf16 row of docs/data/llm_foundry_runs.yaml
    (the FP8 rows' TransformerEngine linears are not modelled): micro-batch, gradient accumulation,
    checkpointing, FSDP over the row's GPUs (SHARD_GRAD_OP: ZeRO-2), Composer's DEFAULT mixed
    precision (bf16 parameters, fp32 reduce: `param_dtype`)."""
    import yaml

    data = yaml.safe_load((ROOT / "docs" / "data" / "llm_foundry_runs.yaml").read_text())
    out = []
    for run in data["runs"]:
        if "fp8" in str(run["precision"]):
            continue
        settings = dict(seq=run["seq"], batch=run["micro_batch"], grad_accum=max(int(run.get("grad_accum") or 1), 1),
                        precision="mixed", mixed_policy="param_dtype", hardware=run["gpu"],
                        recompute="full" if run["activation_checkpointing"] else "none",
                        parallel=Parallel(name="fsdp", dp=run["gpus"],
                                          zero=2 if run.get("sharding_strategy") == "SHARD_GRAD_OP" else 3))
        out.append((run, mpt(data["models"][run["model"]], run["seq"]), settings))
    return out


def llm_foundry_ratios() -> dict[str, list[tuple[float, float, dict]]]:
    """Per table: (stack's estimate / capacity, eager's / capacity, the row) of each bf16 row."""
    by_table: dict[str, list] = {}
    for run, model, settings in llm_foundry_runs():
        stack, cap = estimate(model, settings, LLM_FOUNDRY_KERNELS)
        eager, _ = estimate(model, settings, MPT_EAGER)
        by_table.setdefault(run["table"], []).append((stack / cap, eager / cap, run))
    return by_table


if __name__ == "__main__":
    raise SystemExit(main())
