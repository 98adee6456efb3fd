"""One rank of a multi-GPU job, traced in one process: torch's own DDP, FSDP2 and DTensor under
a fake process group.

`torch.distributed.init_process_group("fake", ...)` (torch.testing._internal.distributed.fake_pg)
answers every collective at once without moving data, so rank 0 of an N-way job runs alone, the
layout applied by torch's own code, and under `FakeTensorMode` nothing is allocated: the storage
tracker counts what a GPU would hold, storage resizes included (`StorageTracker.counting_resizes`).

- ZeRO-2 / ZeRO-3 (`fully_shard_model`): FSDP2 per block and on the root; ZeRO-3 reshards after
  the forward (`reshard_after_forward=True`, torchtitan's and torchtune's), ZeRO-2 keeps a block's
  parameters to its backward. `mixed_policy=param_dtype` is FSDP2's
  `MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)`, as torchtitan configures it.
- ZeRO-0 / ZeRO-1 (`data_parallel`): DistributedDataParallel, its C++ reducer built over the fake
  tensors, allocating the gradient buckets at construction (25 MiB each, the first 1 MiB;
  `gradient_as_bucket_view=False`, DDP's default, so they sit beside the gradients); ZeRO-1 adds
  ZeroRedundancyOptimizer (workloads.make_optimizer). Three things stand in for the network:
  DDP's construction-time checks that read parameter data (shapes and the rank-0 broadcast) and
  its one-time rebuild of the buckets in gradient order (a broadcast of bucket indices; same total
  size) are skipped, and a communication hook returns each bucket as reduced (the fake group's
  all-reduce answers with no tensor; a real one sums in place, allocating nothing).
- Tensor and sequence parallel (`tensor_parallel`): DTensor's `parallelize_module` with
  torchtitan's plan; with dp > 1 and ZeRO-2 / 3 on a 2-D (dp, tp) mesh under FSDP2.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from unittest import mock

import torch
from torch import nn

from memsweep.specs import JobSpec


def unmeasured_layout(spec: JobSpec) -> str | None:
    """Why a parallel layout cannot be traced in one process yet (None: it can)."""
    p = spec.parallel
    if p.gpus == 1:
        return None
    if p.pp > 1 or p.ep > 1:
        return (f"parallel={p.name} (pp={p.pp}, ep={p.ep}): pipeline and expert parallel are analytic; "
                "measured layouts are data parallel (DDP, ZeRO-1, FSDP2) and tensor parallel (DTensor)")
    if p.stack != "fsdp":
        return (f"parallel.stack={p.stack}: DeepSpeed's engine and Megatron's tensor parallel are analytic; a "
                "measured layout is torch's (parallel.stack=fsdp: DDP, ZeroRedundancyOptimizer, FSDP2, DTensor)")
    if p.tp > 1:
        return unmeasured_tensor_parallel(spec)
    if p.zero == 1 and spec.optimizer.in_backward:
        return ("parallel.zero=1 with optimizer.in_backward: ZeroRedundancyOptimizer steps once per step; "
                "in-backward optimizers are measured with parallel.zero=0, 2 or 3")
    if not spec.workload.training:
        return f"parallel={p.name} with workload={spec.workload.name}: data parallel only shards training"
    return None


def unmeasured_tensor_parallel(spec: JobSpec) -> str | None:
    """Why a tensor-parallel job cannot be traced (None: it can): the reference decoders, trained,
    with the parts `tensor_parallel` shards."""
    p, m = spec.parallel, spec.model
    lead = f"parallel.tp={p.tp}"
    if p.dp > 1 and p.zero < 2:
        return (f"{lead} with parallel.dp={p.dp} and parallel.zero={p.zero}: DDP x tensor parallel is analytic; "
                "traced: dp=1, or FSDP2 over the dp ranks (parallel.zero=2 or 3), torchtitan's 2-D layout")
    if spec.measure.impl != "reference":
        return f"{lead} with measure.impl={spec.measure.impl}: tensor parallel is traced with measure.impl=reference"
    if not spec.workload.training:
        return f"{lead} with workload={spec.workload.name}: tensor-parallel inference (a sharded KV cache) is analytic"
    if p.sequence_parallel and spec.seq % p.tp:
        return (f"seq={spec.seq} with {lead} and sequence_parallel: a sequence split unevenly over the ranks "
                "(Megatron-LM and torchtitan require seq divisible by tp; DTensor's from_local assumes even shards)")
    why = None
    if not m.decoder:
        why = "an encoder (its post-norm blocks)"
    elif m.mla or m.experts:
        why = "MLA or MoE blocks"
    elif m.attention_sinks or m.qk_norm == "full":
        why = "per-head sinks or a q/k norm over all heads"
    elif p.sequence_parallel and (m.position == "learned" or m.block_norms == 4):
        why = "learned positions or sandwich norms under sequence parallel"
    elif spec.quant != "none" or spec.kbit:
        why = f"a quantized base (quant={spec.quant})"
    elif spec.effective_kernels.label != "eager" or spec.loss_kernel != "eager" or spec.loss.chunks > 1:
        why = "fused or compiled kernels, or a chunked loss"
    if why:
        return f"{lead}: {why} not sharded by the traced plan (measure/parallel.py); analytic"
    return None


@contextlib.contextmanager
def traced_rank(spec: JobSpec, tracker) -> Iterator[None]:
    """Rank 0 of the job's layout for the whole measurement (build, warm-up and measured steps):
    the fake process group, storage resizes counted, FSDP2's gradients tagged. A single GPU:
    nothing."""
    if spec.parallel.gpus == 1:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(fake_process_group(spec.parallel.gpus))
        stack.enter_context(tracker.counting_resizes())
        stack.enter_context(tagged_gradients(tracker))
        stack.enter_context(seeing_through_dtensors(tracker))
        if spec.parallel.tp > 1:  # the vocabulary-sharded cross-entropy, forward and backward
            from torch.distributed.tensor.parallel import loss_parallel

            stack.enter_context(loss_parallel())
        yield


@contextlib.contextmanager
def seeing_through_dtensors(tracker) -> Iterator[None]:
    """The tracker counts what a DTensor op allocates on the rank's local tensors, its
    temporaries included (a mode sees an op before a subclass does; declining it, the mode then
    sees the DTensor's own ops on plain tensors)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    # DTensor's sharding propagation runs each new op on fake tensors of the global shape (under
    # the fake mode it finds: ours): shape bookkeeping, no memory on a GPU
    propagate = ShardingPropagator._propagate_tensor_meta_non_cached

    def quietly(self, *args, **kwargs):
        with tracker.ignored():
            return propagate(self, *args, **kwargs)

    with mock.patch.object(tracker, "see_through", (DTensor,)), \
            mock.patch.object(ShardingPropagator, "_propagate_tensor_meta_non_cached", quietly):
        yield


@contextlib.contextmanager
def fake_process_group(world: int) -> Iterator[None]:
    """A fake process group of `world` ranks, this process rank 0; destroyed on exit (a sweep
    measures one job after another), the interpreter's excepthook put back."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    hook = sys.excepthook  # init_process_group wraps it ("[rank0]: " on every line) and never restores it
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


def shard_policy(spec: JobSpec) -> dict:
    """`fully_shard`'s keyword arguments for the job: ZeRO-3 reshards after the forward, ZeRO-2
    keeps the gathered parameters to the backward; param_dtype gathers 16-bit parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from memsweep.measure.workloads import TORCH_DTYPES

    kw: dict = {"reshard_after_forward": spec.parallel.zero >= 3}
    if spec.mixed and spec.mixed_policy == "param_dtype":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=TORCH_DTYPES[spec.dtype], reduce_dtype=torch.float32)
    return kw


def shard(spec: JobSpec, model: nn.Module, blocks, tracker) -> None:
    """Rank 0's copy of the model under the job's layout (nothing on one GPU): tensor parallel,
    then FSDP2 for ZeRO-2 / 3 or DDP for ZeRO-0 / 1 (its buckets counted as gradients)."""
    if spec.parallel.gpus == 1:
        return
    tp_mesh, dp_mesh = meshes(spec)
    if tp_mesh is not None:
        tensor_parallel(model, list(blocks), spec, tp_mesh)
    if dp_mesh is None:
        return
    if spec.parallel.zero >= 2:
        fully_shard_model(model, list(blocks), spec, dp_mesh)
    else:
        with tracker.section("setup", "gradients"):  # the buckets
            data_parallel(model)


def meshes(spec: JobSpec):
    """(tensor-parallel mesh, data-parallel mesh), None where the layout has one rank: one 2-D
    mesh (dp, tp) as torchtitan builds it when both are > 1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils._python_dispatch import _disable_current_modes

    p = spec.parallel
    with _disable_current_modes():  # the mesh's rank tensor is real (outside fake and tracking modes)
        if p.tp > 1 and p.dp > 1:
            mesh = init_device_mesh("cpu", (p.dp, p.tp), mesh_dim_names=("dp", "tp"))
            return mesh["tp"], mesh["dp"]
        mesh = init_device_mesh("cpu", (p.gpus,))
    return (mesh, None) if p.tp > 1 else (None, mesh)


def data_parallel(model: nn.Module) -> None:
    """torch's DistributedDataParallel around `model` over the fake process group, its forward
    entered by hooks on the model itself (DDP's `_pre_forward` / `_post_forward`, exactly what its
    own `forward` wraps around the module's), so the callers keep calling the model they built."""
    import torch.nn.parallel.distributed as ddp_module

    # the shape check reads parameter data (fake tensors have none); the broadcast of rank 0's
    # parameters allocates nothing
    with mock.patch.object(ddp_module, "_verify_param_shape_across_processes", _skip), \
            mock.patch.object(ddp_module, "_sync_module_states", _skip):
        ddp = ddp_module.DistributedDataParallel(model)
    ddp.register_comm_hook(None, _reduced_in_place)
    ddp.reducer = _KeptBuckets(ddp.reducer)

    def before(module, args, kwargs):
        ddp._pre_forward(*args, **kwargs)

    def after(module, args, kwargs, output):
        return ddp._post_forward(output)

    # the hooks' closures keep the DDP object (and its reducer, which owns the buckets) alive
    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)


class _KeptBuckets:
    """DDP's reducer as Python calls it, less the one-time rebuild of the buckets in gradient
    order before the second forward (its C++ broadcast of the new bucket indices reads their data;
    the buckets' total size does not change)."""

    def __init__(self, reducer) -> None:
        self._reducer = reducer

    def __getattr__(self, name: str):
        return getattr(self._reducer, name)

    def _rebuild_buckets(self) -> bool:
        return False


def _skip(*args, **kwargs) -> None:
    return None


def _reduced_in_place(state, bucket):
    """DDP's communication hook: the bucket, all-reduced in place (the fake group's all-reduce
    returns no tensor; a real one writes the sum into the same buffer)."""
    done = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done


def tensor_parallel(model: nn.Module, blocks: list[nn.Module], spec: JobSpec, mesh) -> None:
    """Megatron's tensor parallel as torchtitan writes it with DTensor's `parallelize_module`
    (torchtitan/models/llama3/infra/parallelize.py): q, k, v, gate and up column-wise, o and down
    row-wise (their outputs all-reduced, or reduce-scattered over the sequence with
    `sequence_parallel`, whose norms then run on 1/tp of the tokens and whose attention and MLP
    inputs are all-gathered); the embedding row-wise over the vocabulary; the head column-wise,
    its logits left sharded over the vocabulary for `loss_parallel`'s cross-entropy. A LoRA
    adapter follows its layer: B column-wise beside a column-wise weight, A row-wise beside a
    row-wise one, the other replicated."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp, sp = spec.parallel.tp, spec.parallel.sequence_parallel
    tokens = Shard(1) if sp else Replicate()  # the residual stream between blocks

    class Colwise(ColwiseParallel):
        def _partition_linear_fn(self, name, module, device_mesh):
            _place(module, device_mesh, weight=Shard(0), bias=Shard(0), lora_a=Replicate(), lora_b=Shard(0))

    class Rowwise(RowwiseParallel):
        def _partition_linear_fn(self, name, module, device_mesh):
            _place(module, device_mesh, weight=Shard(1), bias=Replicate(), lora_a=Shard(1), lora_b=Replicate())

    parallelize_module(model.tok_emb, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=tokens))
    if sp and model.norm_f is not None:
        parallelize_module(model.norm_f, mesh, SequenceParallel())
    if model.lm_head is not None:
        _place(model.lm_head, mesh, weight=Shard(0))
    model.vocab_parallel = functools.partial(_vocab_parallel_logits, mesh=mesh, layout=tokens)
    for block in blocks:
        attn, mlp = block.attn, block.mlp
        plan = {f"attn.{n}": Colwise() for n in ("q", "k", "v")}
        plan["attn.o"] = Rowwise(output_layouts=tokens)
        plan.update({f"mlp.{n}": Colwise() for n in ("gate", "up") if hasattr(mlp, n)})
        plan["mlp.down"] = Rowwise(output_layouts=tokens)
        if sp:
            plan.update({n: SequenceParallel() for n in ("ln_1", "ln_2") if getattr(block, n) is not None})
            plan["attn"] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                              desired_input_layouts=(Replicate(), None, None, None, None))
            plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        parallelize_module(block, mesh, plan)
        attn.n_head //= tp  # each rank runs its own heads (the views take the local widths)
        attn.n_kv_head //= tp
    _replicate_the_rest(model, mesh)


def _replicate_the_rest(model: nn.Module, mesh) -> None:
    """Parameters no style sharded (norms without sequence parallel, learned positions) become
    replicated DTensors, their modules taking and giving local tensors: every parameter is a
    DTensor, as the optimizer's foreach kernels need (one list may not mix the two)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def plain(module: nn.Module) -> list[str]:
        return [n for n, p in module.named_parameters(recurse=False) if not isinstance(p, DTensor)]

    def to_dtensor(module, inputs, device_mesh):
        return tuple(DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    def to_local(module, output, device_mesh):
        return output.to_local() if isinstance(output, DTensor) else output

    for module in list(model.modules()):
        names = plain(module)
        if names:
            distribute_module(module, mesh, lambda name, mod, m, names=names: _place(mod, m, **dict.fromkeys(names, Replicate())),
                              input_fn=to_dtensor, output_fn=to_local)


def _place(module: nn.Module, mesh, **placements) -> None:
    """Replace each named parameter the module has by a DTensor with its placement."""
    from torch.distributed.tensor import distribute_tensor

    for name, placement in placements.items():
        param = getattr(module, name, None)
        if isinstance(param, nn.Parameter):
            module.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [placement]),
                                                         requires_grad=param.requires_grad))


def _vocab_parallel_logits(x: torch.Tensor, head: torch.Tensor, mesh, layout) -> torch.Tensor:
    """The head's column-wise matmul: the final hidden states (all-gathered over the sequence
    under sequence parallel) times this rank's vocabulary rows; the logits stay a DTensor sharded
    over the vocabulary, which `loss_parallel`'s cross-entropy takes as they are."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(x, DTensor):  # (the final norm's output already is one under sequence parallel)
        x = DTensor.from_local(x, mesh, [layout], run_check=False)
    x = x.redistribute(mesh, [Replicate()])
    return torch.nn.functional.linear(x, head)


def fully_shard_model(model: nn.Module, blocks: list[nn.Module], spec: JobSpec, mesh) -> None:
    """FSDP2 as torchtitan applies it over the data-parallel ranks of the fake process group
    (`traced_rank`): each block its own group, then the root (the embeddings, final norm and head)
    with FSDP2's default for a root, kept gathered from forward to backward. After tensor
    parallel, over the dp dimension of the 2-D mesh (FSDP2 shards the DTensors' local shards)."""
    from torch.distributed.fsdp import fully_shard

    kw = shard_policy(spec)
    with mesh_reads():
        for block in blocks:
            fully_shard(block, mesh=mesh, **kw)
        # the root with FSDP2's default: not resharded after the forward (its backward follows at once)
        kw.pop("reshard_after_forward")
        fully_shard(model, mesh=mesh, **kw)


@contextlib.contextmanager
def mesh_reads() -> Iterator[None]:
    """FSDP2 over DTensor (tensor-parallel) parameters joins the dp and tp meshes into one
    (`DeviceMesh._concatenate`), computing this rank's coordinates from the real rank tensor:
    outside the fake and tracking modes (rank indices, no memory of the job)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.utils._python_dispatch import _disable_current_modes

    concatenate = DeviceMesh._concatenate  # (a staticmethod: the plain function)

    def outside_the_modes(*args, **kwargs):
        with _disable_current_modes():
            return concatenate(*args, **kwargs)

    with mock.patch.object(DeviceMesh, "_concatenate", staticmethod(outside_the_modes)):
        yield


@contextlib.contextmanager
def tagged_gradients(tracker) -> Iterator[None]:
    """FSDP2 assigns each sharded gradient itself after the reduce-scatter (no autograd
    accumulation, so no post-accumulate-grad hook fires): tag them as gradients there."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    original = FSDPParamGroup.post_backward

    def post_backward(group, *args, **kwargs):
        out = original(group, *args, **kwargs)
        for fsdp_param in group.fsdp_params:
            if fsdp_param.sharded_param.grad is not None:  # a DTensor: the tracker retags its local shard
                tracker.retag(fsdp_param.sharded_param.grad, "gradients")
        return out

    with mock.patch.object(FSDPParamGroup, "post_backward", post_backward):
        yield
