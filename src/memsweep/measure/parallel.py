"""One rank of a multi-GPU job, traced in one process: torch's own FSDP2 under a fake process group.

`torch.distributed.init_process_group("fake", ...)` (torch.testing._internal.distributed.fake_pg)
answers every collective at once without moving data, so rank 0 of an N-way job runs alone: the
model is built, `fully_shard` splits every parameter over the data-parallel mesh (dim-0 chunks,
what each rank keeps), and the forward, backward and optimizer step run FSDP2's real code: the
all-gathers into unsharded parameters before each block, their `resize_(0)` after it, the
gradients' reduce-scatter buffers, the sharded AdamW states. Under `FakeTensorMode` nothing is
allocated; the storage tracker counts what a GPU would hold, storage resizes included
(`StorageTracker.counting_resizes`).

Layouts measured this way (`measurable`): data parallel with ZeRO-3 (`fully_shard` per block and
on the root, `reshard_after_forward=True`: FSDP2's default, torchtitan's and torchtune's) and ZeRO-2
(`reshard_after_forward=False`: the unsharded parameters stay from a block's forward to its
backward), with `mixed_policy=autocast` (fp32 parameters gathered in fp32, autocast casts) or
`param_dtype` (FSDP2's `MixedPrecisionPolicy(param_dtype=<dtype>, reduce_dtype=float32)`, as
torchtitan configures it: fp32 shards, 16-bit all-gathers, fp32 gradient reduction).

ZeRO-0 and ZeRO-1 are torch's DistributedDataParallel (`data_parallel`): its C++ reducer, built
over the fake tensors, allocates the gradient buckets at construction (flat buffers, 25 MiB each,
the first 1 MiB; `gradient_as_bucket_view=False`, DDP's default, so they sit beside the
gradients: "the saved memory size will be equal to the total gradients size" when it is True,
DDP's docs) and copies each gradient into its bucket in the backward. ZeRO-1 adds torch's
ZeroRedundancyOptimizer (`make_optimizer`): each rank keeps the optimizer states of its own
parameters, assigned largest first to the least-loaded rank. Two things stand in for the
network: DDP's construction-time checks that read parameter data (shapes and the rank-0
broadcast, which fake tensors do not have) and its one-time rebuild of the buckets in gradient
order (a broadcast of bucket indices; same total size) are skipped, and a communication hook
returns each bucket as reduced (the fake group's all-reduce answers with no tensor; a real
all-reduce is in place on the bucket, allocating nothing).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn

from memsweep.specs import JobSpec


def unmeasured_layout(spec: JobSpec) -> str | None:
    """Why a parallel layout cannot be traced in one process yet (None: it can)."""
    p = spec.parallel
    if p.gpus == 1:
        return None
    if p.tp > 1 or p.pp > 1 or p.ep > 1:
        return (f"parallel={p.name} (tp={p.tp}, pp={p.pp}, ep={p.ep}): tensor, pipeline and expert parallel "
                "are analytic; a measured layout is data parallel with parallel.zero=2 or 3 (FSDP2)")
    if p.stack != "fsdp":
        return (f"parallel.stack={p.stack}: DeepSpeed's engine is analytic; a measured layout is torch's "
                "(parallel.stack=fsdp: DDP, ZeroRedundancyOptimizer, FSDP2)")
    if p.zero == 1 and spec.optimizer.in_backward:
        return ("parallel.zero=1 with optimizer.in_backward: ZeroRedundancyOptimizer steps once per step; "
                "in-backward optimizers are measured with parallel.zero=0, 2 or 3")
    if not spec.workload.training:
        return f"parallel={p.name} with workload={spec.workload.name}: data parallel only shards training"
    return None


@contextlib.contextmanager
def traced_rank(spec: JobSpec, tracker) -> Iterator[None]:
    """Rank 0 of the job's layout for the whole measurement (build, warm-up and measured steps):
    the fake process group, storage resizes counted, FSDP2's gradients tagged. A single GPU:
    nothing."""
    if spec.parallel.gpus == 1:
        yield
        return
    with fake_process_group(spec.parallel.dp), tracker.counting_resizes(), tagged_gradients(tracker):
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
    """Rank 0's copy of the model under the job's data-parallel layout: FSDP2 for ZeRO-2 / 3,
    DDP for ZeRO-0 / 1 (its buckets counted as gradients)."""
    if spec.parallel.gpus == 1:
        return
    if spec.parallel.zero >= 2:
        fully_shard_model(model, list(blocks), spec)
    else:
        with tracker.section("setup", "gradients"):  # the buckets
            data_parallel(model)


def data_parallel(model: nn.Module) -> None:
    """torch's DistributedDataParallel around `model` over the fake process group, its forward
    entered by hooks on the model itself (DDP's `_pre_forward` / `_post_forward`, exactly what its
    own `forward` wraps around the module's), so the callers keep calling the model they built."""
    import torch.nn.parallel.distributed as ddp_module

    saved = ddp_module._verify_param_shape_across_processes, ddp_module._sync_module_states
    ddp_module._verify_param_shape_across_processes = _skip  # reads parameter data (fake tensors have none)
    ddp_module._sync_module_states = _skip  # the broadcast of rank 0's parameters: no memory
    try:
        ddp = ddp_module.DistributedDataParallel(model)
    finally:
        ddp_module._verify_param_shape_across_processes, ddp_module._sync_module_states = saved
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


def zero_redundancy(spec: JobSpec, params: list, cls: type, kw: dict):
    """ZeRO-1: torch's ZeroRedundancyOptimizer, this rank's states only."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kw)


def fully_shard_model(model: nn.Module, blocks: list[nn.Module], spec: JobSpec) -> None:
    """FSDP2 as torchtitan applies it over the data-parallel ranks of the fake process group
    (`traced_rank`): each block its own group, then the root (the embeddings, final norm and head)
    with FSDP2's default for a root, kept gathered from forward to backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():  # the mesh's rank tensor is real (outside fake and tracking modes)
        mesh = init_device_mesh("cpu", (spec.parallel.dp,))
    kw = shard_policy(spec)
    for block in blocks:
        fully_shard(block, mesh=mesh, **kw)
    # the root with FSDP2's default: not resharded after the forward (its backward follows at once)
    kw.pop("reshard_after_forward")
    fully_shard(model, mesh=mesh, **kw)


@contextlib.contextmanager
def tagged_gradients(tracker) -> Iterator[None]:
    """FSDP2 assigns each sharded gradient itself after the reduce-scatter (no autograd
    accumulation, so no post-accumulate-grad hook fires): tag them as gradients there."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    original = FSDPParamGroup.post_backward

    def post_backward(group, *args, **kwargs):
        out = original(group, *args, **kwargs)
        for fsdp_param in group.fsdp_params:
            grad = fsdp_param.sharded_param.grad
            if grad is not None:
                tracker.retag(grad.to_local() if hasattr(grad, "to_local") else grad, "gradients")
        return out

    FSDPParamGroup.post_backward = post_backward
    try:
        yield
    finally:
        FSDPParamGroup.post_backward = original
