"""What a measured job runs: a training step or prefill + decode, as a user's plain PyTorch would.

Training: forward and cross-entropy on fp32 logits (both under autocast when mixed, as PyTorch's
AMP recipe writes it; on CPU tensors with CUDA's cast policy, measure/autocast.py), backward,
`optimizer.step()`, `zero_grad(set_to_none=True)`. The logits tensor is not kept past the loss
(a careful training loop drops it; autograd keeps only what backward needs). fp16 mixed runs
without a GradScaler: unscaling is in place and costs no memory, and its `found_inf.item()`
cannot run under FakeTensorMode.

Inference: no autograd; a KV cache for prompt + generated tokens, a prefill of `seq` tokens that
keeps only the last position's logits, then greedy decoding one token at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memsweep.columns import Columns
from memsweep.formulas.techniques import liger_chunk_tokens
from memsweep.measure import kernels
from memsweep.measure.models import FUSABLE, ReferenceModel, build_model
from memsweep.measure.parallel import shard, unmeasured_layout
from memsweep.measure.timing import NO_TIMER, NoTimer, PhaseTimer
from memsweep.measure.tracker import StorageTracker
from memsweep.specs import JobSpec

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MEASURABLE_DTYPES = tuple(TORCH_DTYPES)
LEARNING_RATE = 1e-5  # any value: memory does not depend on it


class Unmeasurable(Exception):
    """A configuration this backend cannot run (becomes status=skipped, not an error)."""


class _NoTracker:
    """Stands in for a StorageTracker when a backend measures with the allocator instead."""

    @contextmanager
    def section(self, phase: str, category: str) -> Iterator[None]:
        yield

    def mark(self, name: str) -> None:
        pass

    def retag(self, tensor: torch.Tensor, category: str) -> None:
        pass

    def forget(self, tensor: torch.Tensor) -> None:
        pass

    def adopt(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        pass


@dataclass
class Prepared:
    """A built model, its optimizer and inputs, ready to `step()` any number of times.

    `tracker` may be swapped between steps (the cuda backend times untracked steps, then tracks
    one); the gradient hooks and phase sections always use the current one. So may `timer`
    (measure/timing.py: timed steps only): the step wraps each phase in `timer.phase(...)`.
    """

    model: ReferenceModel
    optimizer: torch.optim.Optimizer | None
    tokens_per_step: int
    run: Callable[[Prepared], None]
    tracker: StorageTracker | _NoTracker
    timer: PhaseTimer | NoTimer = NO_TIMER

    def step(self) -> None:
        self.run(self)


def storage_dtypes(spec: JobSpec) -> tuple[torch.dtype, torch.dtype]:
    """(base weights, trainable adapters): mixed keeps trained params in fp32; a frozen LoRA base
    and everything in pure mode or inference use the dtype."""
    if spec.dtype not in TORCH_DTYPES:  # int8 / int4 weights compute in 16 bits (spec.quant stores them)
        return torch.bfloat16, torch.bfloat16
    dtype = TORCH_DTYPES[spec.dtype]
    if not spec.mixed:
        return dtype, dtype
    return (dtype if spec.workload.kind == "lora" else torch.float32), torch.float32


def make_optimizer(spec: JobSpec, params: list[torch.nn.Parameter], per_parameter: bool = False) -> torch.optim.Optimizer:
    """The job's optimizer over `params`; under ZeRO-1 (dp > 1) torch's ZeroRedundancyOptimizer
    around it (measure/parallel.py), unless it is one of `optimizer.in_backward`'s per-parameter ones."""
    cls, kw = optimizer_class(spec)
    if spec.parallel.zero == 1 and spec.parallel.dp > 1 and not per_parameter:
        from torch.distributed.optim import ZeroRedundancyOptimizer  # this rank's states only

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kw)
    return cls(params, **kw)


def optimizer_class(spec: JobSpec) -> tuple[type, dict]:
    """The optimizer's class and keyword arguments."""
    impl = spec.optimizer.impl
    name = spec.optimizer.name
    if name in ("adamw8bit", "paged_adamw8bit", "lion", "adafactor"):
        from memsweep.measure import optimizers  # bitsandbytes' and transformers' layouts (measure/optimizers.py)

        if name == "lion":
            return optimizers.Lion, {"lr": LEARNING_RATE}
        if name == "adafactor":
            return optimizers.Adafactor, {"lr": LEARNING_RATE, "scale_parameter": False, "relative_step": False,
                                          "beta1": 0.9 if spec.optimizer.first_moment else None}
        return (optimizers.PagedAdamW8bit if name == "paged_adamw8bit" else optimizers.AdamW8bit), {"lr": LEARNING_RATE}
    kw = {"lr": LEARNING_RATE, "foreach": impl == "foreach", "fused": True if impl == "fused" else None}
    if name == "adamw":
        return torch.optim.AdamW, kw
    if name == "adam":
        return torch.optim.Adam, kw
    return torch.optim.SGD, {"momentum": 0.9 if name == "sgd_momentum" else 0.0, **kw}


def check_techniques(spec: JobSpec, impl: str) -> None:
    """The techniques a measurement can trace on this machine; the rest are analytic (a row with
    status skipped says which)."""
    why = None
    if spec.kv_dtype != "auto":
        why = f"kv_dtype={spec.kv_dtype}: the reference attention has no fp8 / int8 cache kernel; the cache's bytes are analytic"
    elif impl == "hf" and spec.quant != "none":
        why = f"quant={spec.quant}: transformers' quantized layers need bitsandbytes / GPTQ kernels on a GPU; measure.impl=reference traces the layout"
    elif impl == "hf" and spec.loss.chunks != 1:
        why = "loss.chunks with measure.impl=hf: measured with the reference models (measure.impl=reference)"
    elif spec.offload.any:
        why = "offload: a single-process CPU trace has no second memory to offload to; cpu_bytes and the GPU share are analytic"
    elif spec.mixed and spec.mixed_policy != "autocast" and spec.parallel.zero < 2:
        why = ("mixed_policy=param_dtype on one GPU: DeepSpeed's 16-bit copies are analytic here; measured under "
               "FSDP2 (parallel.zero=2 or 3), or measure autocast")
    elif spec.quant != "none" and spec.model.experts:
        why = f"quant={spec.quant} of an MoE model: the reference experts are not quantized"
    if why:
        raise Unmeasurable(why)


def check_layout(spec: JobSpec, device: str) -> None:
    """A parallel layout is traced as its rank 0 under a fake process group (measure/parallel.py);
    a GPU run is one process on one GPU."""
    p = spec.parallel
    if p.gpus > 1 and str(device).startswith("cuda"):
        raise Unmeasurable(f"parallel={p.name} spans {p.gpus} GPUs; measure=cuda is one process on one GPU "
                           "(measure=fake traces rank 0 of a data-parallel layout)")
    why = unmeasured_layout(spec)
    if why:
        raise Unmeasurable(why)


def prepare(spec: JobSpec, device: str, tracker: StorageTracker | None = None,
            last_decode_only: bool = False) -> Prepared:
    """Build the model (weights), optimizer and inputs on `device`; return the step to run.

    `last_decode_only`: decode just the final token (the cache jumps to it, KVCache.jump). Decoding
    keeps no state beyond the cache and the previous logits, and the last step attends to the
    most positions and grows the longest cache, so its peak is the decode peak (the jump's own
    transient is smaller): O(1) instead of O(gen) steps.
    """
    t = tracker or _NoTracker()
    base_dtype, adapter_dtype = storage_dtypes(spec)
    check_layout(spec, device)
    check_techniques(spec, "reference")
    fused = tuple(op for op in FUSABLE if getattr(spec.kernels, op) == "fused")
    if str(device).startswith("cuda") and (fused or spec.loss_kernel != "eager"):
        # on a GPU the emulated kernels' arithmetic would reach the CUDA allocator's peak
        raise Unmeasurable(f"kernels={spec.effective_kernels.label}: the fused kernels are emulated for the trace "
                           "(measure=fake, cpu); a GPU run measures the stack's own kernels, not wired here")
    w = spec.workload
    with t.section("setup", "weights"):
        model = build_model(
            spec.model, attention=spec.attention, recompute=spec.recompute,
            lora_rank=w.lora_rank if w.kind == "lora" else 0,
            lora_targets=w.lora_targets if w.kind == "lora" else (),
            lora_dropout=w.lora_dropout if w.kind == "lora" else 0.0,
            dtype=base_dtype, device=device,
            fused=fused, compile=spec.kernels.compile)
        if spec.kernels.compile and str(device).startswith("cuda"):
            from memsweep.measure.compiled import InductorCompiler

            model.compiler = InductorCompiler()  # a GPU runs Inductor itself
        for p in model.lora_parameters():
            p.data = p.data.to(adapter_dtype)
        if spec.quant != "none":  # the frozen block matrices as their format stores them
            from memsweep.measure.quantized import quantize_blocks

            quantize_blocks(model, spec.quant, spec.quant_group, w.double_quant)
        if spec.kbit:  # peft's prepare_model_for_kbit_training: every 16-bit parameter left to fp32
            for p in model.base_parameters():
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.to(torch.float32)
        shard(spec, model, model.blocks, t)
    with t.section("setup", "activations"):
        ids = torch.randint(0, spec.model.vocab, (spec.batch, spec.seq), device=device)
    if w.training:
        return _prepare_train(spec, model, ids, t)
    return _prepare_inference(spec, model, ids, t, last_decode_only)


def _prepare_train(spec: JobSpec, model: ReferenceModel, ids: torch.Tensor, tracker) -> Prepared:
    targets = ids.roll(-1, dims=1)  # next-token targets (MLM on every position for bert)

    model.keep_train_cache = spec.workload.use_cache

    def forward_loss(autocast) -> torch.Tensor:
        # the loss inside autocast, as PyTorch's AMP recipe and transformers (labels=) write it:
        # autocast's cache of 16-bit weight copies lives until the loss is computed
        with autocast:
            chunks = spec.loss.chunks
            if chunks > 1:
                # torchtune's CEWithChunkedOutputLoss: the head runs per sequence chunk, each
                # chunk's logits are upcast and reduced on their own, summed, over the tokens
                logits = model(ids, chunks=chunks)  # [(B, T / N, V)] * N
                loss = sum(F.cross_entropy(lc.float().flatten(0, 1), tc.flatten(), reduction="sum")
                           for lc, tc in zip(logits, targets.chunk(chunks, dim=1))) / targets.numel()
            elif spec.loss_kernel == "fused_linear":  # Liger's: the head runs inside the loss
                x = model(ids, hidden=True).flatten(0, 1)  # (t, h)
                chunk = int(liger_chunk_tokens(Columns.from_arrays(batch=spec.batch, seq=spec.seq, vocab=spec.model.vocab,
                                                                   hidden=spec.model.hidden))[0])
                loss = kernels.fused_linear_cross_entropy(x, model.head_weight, targets.flatten(), chunk)
            elif spec.loss_kernel == "fused":  # one kernel on the 16-bit logits, as the head made them
                loss = kernels.fused_cross_entropy(model(ids).flatten(0, 1), targets.flatten())
            elif model.compiler is not None and spec.kernels.compile_loss:  # torchtune's compile_loss
                loss = model.compiler.loss(model(ids), targets)
            else:
                logits = model(ids)  # (B, T, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        model.train_cache = None  # as transformers' output (and its cache) dies with the step's loop
        return loss  # logits die here

    return train_step(spec, model, ids, tracker, forward_loss)


def train_step(spec: JobSpec, model: torch.nn.Module, ids: torch.Tensor, tracker,
               forward_loss: Callable[[Any], torch.Tensor]) -> Prepared:
    """The training loop shared by every model implementation: `forward_loss(autocast)` is the
    forward pass and loss (the only part that differs), then backward and the optimizer step,
    each in its tracked phase; gradients are tagged as they land. Timed phases: forward (with the
    loss) and backward once per micro-batch, optimizer once per step; what runs inside
    `loss.backward()` (recomputation, in-backward optimizer steps) is backward's."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    in_backward = spec.optimizer.in_backward
    # optimizer.in_backward: one optimizer per parameter, stepped in its post-accumulate-grad hook
    # (torchtune's optimizer_in_bwd), the gradient freed right after
    per_param = {p: make_optimizer(spec, [p], per_parameter=True) for p in params} if in_backward else {}
    optimizer = None if in_backward else make_optimizer(spec, params)
    # mixed_policy=param_dtype: FSDP2 gathers 16-bit parameters, no autocast (measure/parallel.py)
    autocast = (torch.autocast(ids.device.type, dtype=TORCH_DTYPES[spec.dtype])
                if spec.mixed and spec.mixed_policy == "autocast" else nullcontext())

    def step(prepared: Prepared) -> None:
        t, clock = prepared.tracker, prepared.timer
        for _ in range(spec.grad_accum):  # micro-batches: gradients accumulate in place
            with clock.phase("forward"), t.section("forward", "activations"):
                loss = forward_loss(autocast)
            t.mark("after_forward")  # what autograd saved for backward (+ the loss)
            with clock.phase("backward"), t.section("backward", "activations"):
                loss.backward()
                del loss
            t.mark("after_backward")
        with clock.phase("optimizer"), t.section("optimizer", "optimizer"):
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    prepared = Prepared(model, optimizer, spec.batch * spec.seq * spec.grad_accum, step, tracker)
    for p in params:  # gradients are made by autograd ops; tag them as such when they land
        p.register_post_accumulate_grad_hook(lambda p: prepared.tracker.retag(p.grad, "gradients"))
    if in_backward:
        def step_now(p: torch.nn.Parameter) -> None:
            with prepared.tracker.section("backward", "optimizer"):
                per_param[p].step()
            per_param[p].zero_grad(set_to_none=True)

        for p in params:
            p.register_post_accumulate_grad_hook(step_now)
    return prepared


def _prepare_inference(spec: JobSpec, model: ReferenceModel, ids: torch.Tensor, tracker,
                       last_decode_only: bool) -> Prepared:
    model.eval()
    gen = spec.gen_tokens

    @torch.no_grad()
    def step(prepared: Prepared) -> None:
        t, clock = prepared.tracker, prepared.timer
        if not spec.model.decoder:
            with clock.phase("prefill"), t.section("prefill", "activations"):
                model(ids)
            return
        with clock.phase("prefill"):  # the cache's allocation and the prompt's forward
            with t.section("prefill", "kv_cache"):
                cache = model.new_cache(spec.batch, spec.seq + gen)
                cache.tracker = t  # its tensors are counted as kv_cache as they are made
            with t.section("prefill", "activations"):
                if spec.workload.prefill_logits == "all":
                    # older transformers: the whole prompt's logits, upcast to fp32, of which
                    # generate keeps the last position (a copy)
                    logits = model(ids, cache).float()
                    logits = logits[:, -1:].clone()  # (B, 1, V)
                else:
                    logits = model(ids, cache, last_only=True)  # (B, 1, V)
        with t.section("decode", "activations"):
            if last_decode_only and gen > 1:
                cache.jump(gen - 1)  # as decoding them leaves it; the last step is the decode peak
            for _ in range(min(gen, 1) if last_decode_only else gen):
                with clock.phase("decode_token"):  # greedy pick + one forward
                    logits = model(logits.argmax(-1), cache, last_only=True)

    return Prepared(model, None, spec.batch * (spec.seq + gen), step, tracker)
