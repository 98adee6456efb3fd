"""How fast will a step be: time = the slower of compute and memory per phase, plus communication.

Each phase of a step runs at the slower of its two limits (a roofline, Williams et al. 2009):

    phase_s = max(flops / (peak_flops x compute_efficiency), bytes / (hbm x memory_efficiency))

with the work of `formulas.work.step_work` (FLOPs exact against FlopCounterMode, bytes counted
from what a phase must read and write) and the hardware preset's peak dense throughput for the
compute dtype and its HBM bandwidth (conf/hardware/, docs/hardware.md). A flash kernel (`sdpa`)
skips the masked half of causal attention: its FLOPs are the causal count, eager's the full one.

Parallel layouts divide the work and add communication (ring collectives: an all-reduce moves
2 (n - 1) / n of the buffer per rank, an all-gather or reduce-scatter (n - 1) / n; Patarasuk &
Yuan 2009, NCCL's bus-bandwidth convention):

- tensor parallel (Megatron, Shoeybi et al. 2019): 2 all-reduces of the block's output per layer
  in the forward, 2 in the backward (and 2 more in a recomputed forward);
- data parallel: ZeRO 0 / 1 all-reduce the gradients once per step; ZeRO 2 reduce-scatters them
  and all-gathers the updated 16-bit weights; ZeRO 3 / FSDP all-gathers the weights in the forward
  and again in the backward and reduce-scatters the gradients, every micro-batch (Rajbhandari et
  al. 2020);
- pipeline (1F1B, Narayanan et al. 2021): m micro-batches take (m + pp - 1) stage-slots, the
  bubble being (pp - 1) of them; activations cross each stage boundary forward and back;
- expert parallel: two all-to-alls (dispatch, combine) per MoE layer in the forward, two in the
  backward (Lepikhin et al. 2021), of the routed tokens' hidden states.

A collective within a node runs over NVLink (PCIe when a card has none), beyond it over the
network. Data-parallel collectives hide under the forward and backward (`dp_overlap`); the
others are exposed.

The efficiency constants are named and calibratable (`scripts/fit.py --calibrate` on cuda-timed
rows, memsweep.time_fit); their defaults are what well-tuned kernels reach on A100 / H100, each
with its source. A calibration's YAML (`time_calibrated.yaml`) is read by `load_constants` and
selected with the sweep's and the planner's `time=PATH` (`constants_option`).
Pure numpy; no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memsweep.columns import Array, Columns, pipeline_shards, stage_layers_max
from memsweep.errors import ConfigError

GB = 1e9
TERA = 1e12


@dataclass(frozen=True)
class TimeConstants:
    compute_efficiency: float = 0.7
    """Achieved fraction of the dense tensor-core peak on a step's matmuls. Large bf16 GEMMs reach
    70-80 % of peak on A100 / H100 (NVIDIA, "Matrix Multiplication Background User's Guide",
    GEMM performance figures); the step's smaller and attention matmuls pull the mean down."""
    memory_efficiency: float = 0.8
    """Achieved fraction of the datasheet HBM bandwidth by streaming kernels (elementwise, optimizer
    steps, decode's weight reads): BabelStream-style copies reach 80-90 % on A100 / H100 (Deakin et
    al., BabelStream results)."""
    comm_efficiency: float = 0.75
    """Achieved fraction of a link's unidirectional bandwidth by NCCL ring collectives (nccl-tests
    bus bandwidth: about 230 of 300 GB/s all-reduce on DGX A100 NVLink)."""
    dp_overlap: float = 1.0
    """Share of the forward + backward time under which data-parallel collectives hide: DDP
    all-reduces gradient buckets while the backward runs (Li et al. 2020, "PyTorch Distributed",
    sec. 3.2.3) and FSDP prefetches the next layer's all-gather (Zhao et al. 2023, sec. 3.3), so
    only what exceeds the compute is exposed. Tensor-, pipeline- and expert-parallel collectives
    sit on the critical path (Megatron's all-reduces are synchronous) and are never hidden."""


CALIBRATABLE = ("compute_efficiency", "memory_efficiency", "comm_efficiency", "dp_overlap")

BOUNDS: dict[str, tuple[float, float]] = {
    "compute_efficiency": (0.0, 1.0), "memory_efficiency": (0.0, 1.0),
    "comm_efficiency": (0.0, 1.0), "dp_overlap": (0.0, 1.0),
}
"""What a constant may be: an efficiency in (0, 1] (a fraction of a peak), dp_overlap in [0, 1]."""

CONSTANTS_KEY = "time_constants"
"""The mapping of a time_calibrated.yaml that holds the constants (the rest is provenance)."""


def constants_to_dict(k: TimeConstants) -> dict[str, float]:
    return {name: float(getattr(k, name)) for name in CALIBRATABLE}


def constants_from_dict(values: object) -> TimeConstants:
    """TimeConstants from a mapping of some of their names (the others keep their defaults);
    ValueError naming the first unknown name or out-of-range value."""
    if not isinstance(values, dict):
        raise ValueError(f"a mapping of {', '.join(CALIBRATABLE)}")
    out = {}
    for name, value in values.items():
        if name not in BOUNDS:
            raise ValueError(f"unknown constant {name!r} (known: {', '.join(CALIBRATABLE)})")
        lo, hi = BOUNDS[name]
        open_low = name != "dp_overlap"
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value)
                or value > hi or value < lo or (open_low and value <= lo)):
            raise ValueError(f"{name}={value!r} is outside {'(' if open_low else '['}{lo:g}, {hi:g}]")
        out[name] = float(value)
    return TimeConstants(**out)


def load_constants(path: str | Path) -> TimeConstants:
    """The constants of a time_calibrated.yaml (its `time_constants` mapping), or of a YAML that
    is only such a mapping. OSError, yaml.YAMLError or ValueError when it is not one."""
    import yaml

    doc = yaml.safe_load(Path(path).expanduser().read_text())
    if isinstance(doc, dict) and CONSTANTS_KEY in doc:
        doc = doc[CONSTANTS_KEY]
    elif isinstance(doc, dict) and set(doc) - set(BOUNDS):
        formula = " (a calibrated formula: select it with formula=)" if "constants" in doc else ""
        raise ValueError(f"no {CONSTANTS_KEY} mapping{formula}")
    return constants_from_dict(doc)


def dump_constants(k: TimeConstants, provenance: dict | None = None, header: str = "",
                   name: str = "time_calibrated") -> str:
    """The YAML text `load_constants` reads back: name, time_constants, provenance."""
    import yaml

    doc = {"name": name, CONSTANTS_KEY: constants_to_dict(k), **({"provenance": provenance} if provenance else {})}
    return header + yaml.safe_dump(doc, sort_keys=False)


def constants_option(value: object, key: str = "time") -> TimeConstants:
    """The sweep's and the planner's `time` key: null (the built-in defaults above) or the path
    of a time_calibrated.yaml. Anything else is a one-line ConfigError naming the key."""
    if value is None or value == "null":
        return TimeConstants()
    allowed = "null (the built-in constants) or the path of a time_calibrated.yaml (scripts/fit.py --calibrate)"
    if not isinstance(value, str) or not value.endswith((".yaml", ".yml")):
        raise ConfigError(key, value, allowed)
    if not Path(value).expanduser().is_file():
        raise ConfigError(key, value, f"{allowed}; no such file")
    import yaml

    try:
        return load_constants(value)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        why = str(exc).splitlines()[0] if isinstance(exc, ValueError) and str(exc) else type(exc).__name__
        raise ConfigError(key, value, f"{allowed} ({why})") from None


@dataclass(frozen=True)
class Speeds:
    """Per row, the hardware's peaks in SI units (0 = unknown: the estimate is NaN)."""

    flops: Array          # peak dense FLOP/s for the job's compute dtype
    hbm: Array            # HBM bytes/s
    intra: Array          # per-GPU unidirectional bytes/s within a node (NVLink, else PCIe)
    network: Array        # per-GPU unidirectional bytes/s between nodes
    gpus_per_node: Array

    @classmethod
    def of(cls, hardware: Sequence[object], dtypes: Sequence[str]) -> Speeds:
        """From Hardware specs (their tflops_* / *_gbs fields) and each job's dtype."""
        rows = [(_peak_flops(h, d), _get(h, "hbm_gbs") * GB,
                 (_get(h, "nvlink_gbs") or _get(h, "pcie_gbs")) * GB, _get(h, "network_gbs") * GB,
                 _get(h, "gpus_per_node") or 8.0) for h, d in zip(hardware, dtypes)]
        arr = np.array(rows, dtype=np.float64).reshape(-1, 5)
        return cls(*(arr[:, i] for i in range(5)))


def _get(hw: object, name: str) -> float:
    return float(getattr(hw, name, 0.0) or 0.0)


COMPUTE_PEAK = {"fp32": "tflops_fp32", "fp16": "tflops_fp16", "bf16": "tflops_bf16",
                "int8": "tflops_bf16", "int4": "tflops_bf16"}
"""The peak a dtype computes at. int8 / int4 are weight-only formats: their matmuls dequantize
and run in 16 bits. fp32 runs at the fp32 rate: PyTorch leaves TF32 matmuls off by default
(`torch.backends.cuda.matmul.allow_tf32 = False` since 1.12)."""


def _peak_flops(hw: object, dtype: str) -> float:
    return _get(hw, COMPUTE_PEAK.get(dtype, "tflops_bf16")) * TERA


@dataclass(frozen=True)
class StepTime:
    """Per row: seconds by phase and in all, throughput and model FLOPs utilisation."""

    forward_s: Array
    backward_s: Array
    optimizer_s: Array
    prefill_s: Array
    decode_s: Array
    comm_s: Array          # exposed communication (critical-path collectives + what dp overlap does not hide)
    bubble_s: Array
    step_s: Array          # training: one optimizer step; inference: one request (prefill + decode)
    tokens_per_s: Array    # per GPU: training tokens, inference generated tokens (prompt tokens without decode)
    mfu: Array             # model FLOPs (no recompute; attention as its kernel runs it: causal for sdpa) / time / peak
    flops: Array           # per GPU, every matmul FLOP the step runs (recompute included)
    bytes_moved: Array     # per GPU


def _phase(flops: Array, nbytes: Array, peak: Array, hbm: Array, k: TimeConstants) -> Array:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.maximum(flops / (peak * k.compute_efficiency), nbytes / (hbm * k.memory_efficiency))


def _ring(n: Array, nbytes: Array, factor: float, bw: Array, k: TimeConstants) -> Array:
    """A ring collective over n ranks: factor (n - 1) / n of `nbytes` per rank over the link."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 1, factor * (n - 1) / n * nbytes / (bw * k.comm_efficiency), 0.0)


def step_time(c: Columns, speeds: Speeds, k: TimeConstants = TimeConstants(), work=None) -> StepTime:
    """Every row's estimate (module docstring); a hardware without speeds gives NaN, silently."""
    with np.errstate(all="ignore"):
        return _step_time(c, speeds, k, work)


def _step_time(c: Columns, speeds: Speeds, k: TimeConstants, work) -> StepTime:
    w = production_work(c) if work is None else work
    shards = c.tp * pipeline_shards(c)
    sdpa = 1.0 - c.eager_attention
    # what the kernels run: a flash kernel skips causal attention's masked blocks
    kernel = sdpa * (w.causal_attention_flops - w.attention_flops)

    def run(flops: Array) -> Array:  # a phase's kernel FLOPs, its share of the attention saving
        return flops + kernel * np.where(w.matmul_flops > 0, flops / np.maximum(w.matmul_flops, 1.0), 0.0)

    peak, hbm = speeds.flops, speeds.hbm
    fwd = _phase(run(w.forward_flops) / shards, w.forward_bytes / shards, peak, hbm, k)
    bwd = _phase(run(w.backward_flops + w.recompute_flops) / shards, w.backward_bytes / shards, peak, hbm, k)
    opt_shards = shards * np.where(c.zero >= 1, c.dp, 1.0)
    opt = _phase(w.optimizer_flops / opt_shards, w.optimizer_bytes / opt_shards, peak, hbm, k)
    pre = _phase(run(w.prefill_flops) / shards, w.prefill_bytes / shards, peak, hbm, k)
    dec = _phase(run(w.decode_flops) / shards, w.decode_bytes / shards, peak, hbm, k)
    training = c.training == 1
    fwd, bwd, opt = (np.where(training, x, 0.0) for x in (fwd, bwd, opt))
    pre, dec = (np.where(training, 0.0, x) for x in (pre, dec))

    # pipeline: m micro-batches in (m + pp - 1) slots of one stage's micro-batch
    m = np.maximum(c.grad_accum, 1.0)
    bubble = (fwd + bwd) / m * (c.pp - 1)
    critical, dp = communication_s(c, speeds, k)
    exposed = critical + np.maximum(dp - k.dp_overlap * (fwd + bwd), 0.0)
    step = fwd + bwd + opt + pre + dec + bubble + exposed

    tokens = c.batch * c.seq * m / shards
    generated = c.batch * c.gen_tokens / shards
    with np.errstate(divide="ignore", invalid="ignore"):
        tps = np.where(training, tokens, np.where(c.gen_tokens > 0, generated, c.batch * c.seq / shards)) / step
        model_flops = (w.matmul_flops - w.recompute_flops + kernel) / shards
        mfu = model_flops / step / peak
    bad = ~(np.isfinite(step) & (peak > 0) & (hbm > 0))
    nan = lambda x: np.where(bad, np.nan, x)  # noqa: E731 (unknown hardware speeds: no estimate)
    flops = w.matmul_flops / shards
    moved = (w.forward_bytes + w.backward_bytes + w.prefill_bytes + w.decode_bytes) / shards + w.optimizer_bytes / opt_shards
    return StepTime(nan(fwd), nan(bwd), nan(opt), nan(pre), nan(dec), nan(exposed), nan(bubble), nan(step),
                    nan(tps), nan(mfu), flops, moved)


def production_work(c: Columns):
    """The work as production kernels run it, which is what a step's time follows: MoE experts
    compute only their routed tokens (dropless grouped GEMMs: MegaBlocks, Gale et al. 2023; vLLM's
    fused MoE), not the reference's padded E x ceil(t k / E) rows; and MLA decodes with the
    up-projections absorbed (DeepSeek-V2, sec. 2.1.3), not re-expanding the latent cache every
    step. The reference's own count (FlopCounterMode's) is `step_work(c)`."""
    from dataclasses import replace

    from memsweep.formulas.work import mla_cache_expansion_flops, step_work

    w = step_work(c, dropless=True)
    return replace(w, decode_flops=w.decode_flops - mla_cache_expansion_flops(c))


def communication_s(c: Columns, speeds: Speeds, k: TimeConstants) -> tuple[Array, Array]:
    """Seconds of the collectives of one step (training) or request (inference): those on the
    critical path (tensor, pipeline, expert parallel) and the data-parallel ones, before overlap."""
    act = np.where(c.dtype_bytes >= 4, 4.0, 2.0)  # activations in the compute dtype (16 or 32 bits)
    m = np.maximum(c.grad_accum, 1.0)
    training = c.training == 1
    node = speeds.gpus_per_node
    tp_bw = np.where(c.tp <= node, speeds.intra, speeds.network)
    within = c.tp * c.pp * c.dp <= node
    dp_bw = np.where(within, speeds.intra, speeds.network)

    # tensor parallel: 2 all-reduces of (b, s, h) per layer forward, 2 backward, 2 recomputed
    tokens = np.where(training, c.batch * c.seq, c.batch * (c.seq + c.gen_tokens))
    layer_out = tokens * c.hidden * act
    per_pass = 2.0 * stage_layers_max(c)
    passes = np.where(training, m * (2.0 + c.recompute_full), 1.0)
    tp = _ring(c.tp, layer_out, 2.0, tp_bw, k) * per_pass * passes

    # data parallel: the gradients (trainable parameters, fp32 under AMP) and the weights in the
    # compute dtype (ZeRO 2 after the step, ZeRO 3 every forward and backward; LoRA's frozen base too)
    from memsweep.columns import base_params, trainable_params

    trainable = trainable_params(c) / (c.tp * pipeline_shards(c))
    grads = trainable * np.where(c.mixed == 1, 4.0, c.dtype_bytes)
    weights = base_params(c) / (c.tp * pipeline_shards(c)) * act
    z = c.zero
    dp = np.where(z <= 1, _ring(c.dp, grads, 2.0, dp_bw, k),
                  np.where(z == 2, _ring(c.dp, grads, 1.0, dp_bw, k) + _ring(c.dp, weights, 1.0, dp_bw, k),
                           m * (2.0 * _ring(c.dp, weights, 1.0, dp_bw, k)) + _ring(c.dp, grads, 1.0, dp_bw, k)))
    dp = np.where(training, dp, 0.0)

    # pipeline: activations cross each of the pp - 1 boundaries, forward and back, per micro-batch
    with np.errstate(divide="ignore", invalid="ignore"):
        p2p = np.where(c.pp > 1, (c.pp - 1) / c.pp * layer_out / c.tp * np.where(training, 2.0 * m, 1.0)
                       / (np.where(c.tp * c.pp <= node, speeds.intra, speeds.network) * k.comm_efficiency), 0.0)

    # expert parallel: dispatch + combine of the routed tokens per MoE layer, forward and backward
    routed = tokens * c.experts_per_token * c.hidden * act
    a2a = _ring(c.ep, routed, 1.0, dp_bw, k) * 2.0 * c.moe_layers / pipeline_shards(c) * np.where(training, 2.0 * m, 1.0)
    a2a = np.where(c.experts > 0, a2a, 0.0)
    return tp + p2p + a2a, dp
