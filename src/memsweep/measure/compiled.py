"""`kernels.compile=true` (issue 30): each block compiled as torchtitan, torchtune and OLMo-core
compile them (`torch.compile` per transformer block), traced, not assumed.

AOTAutograd traces the block's forward and backward into one joint graph (with the decompositions
Inductor uses) and `min_cut_rematerialization_partition`, Inductor's default partitioner, splits
it: the forward graph's extra outputs are the tensors the compiled block saves for its backward;
everything else the partitioner recomputes there. The block is traced once, on the first call, and
every block runs the two graphs, op by op, under the tracker: what is saved, and when it dies, is
the partitioner's choice. What is not modelled: Inductor fuses the pointwise ops inside each graph
into kernels that never write their intermediates, so a graph's own transients here are an upper
bound of Inductor's (its buffer reuse frees each buffer at its last use, as the graph run does).

The trace runs with the dispatch modes off (the storage tracker must not count the tracer's fake
tensors, which the graphs' metadata keeps) but inside the step's autocast and SDPA-kernel choice,
so the graphs hold the casts and attention kernels the eager step would run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes


def _partitioner():
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    return min_cut_rematerialization_partition


def _decompositions() -> dict:
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


class _Graphs:
    """The forward and backward graphs of one block, as the partitioner split them."""

    def __init__(self) -> None:
        self.forward: torch.fx.GraphModule | None = None
        self.backward: torch.fx.GraphModule | None = None
        self.outputs = 0  # the forward graph's outputs that are the block's (the rest: saved)


EXTERN = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product", "convolution", "embedding", "_grouped_mm",
          "_efficient_attention", "_flash_attention", "_cudnn_attention")
"""Ops Inductor does not generate but calls (cuBLAS matmuls, the attention kernels, embedding
lookups, ...): their inputs must be in memory, and they write their outputs there."""


def _extern(node: torch.fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    return node.op == "call_function" and any(name.startswith(e) or f".{e}" in name for e in EXTERN)


class FusedRun(torch.fx.Interpreter):
    """Runs a graph as Inductor's generated code lays out memory: every other op fuses into the
    kernels around it, so an intermediate is written to memory only when an extern op reads it, an
    extern op made it, or the graph returns it; the rest are computed and dropped in registers.
    The trackers stop counting such a value's storage as soon as it is made."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        outputs = {a for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes}

        def read_in_memory(n: torch.fx.Node) -> bool:  # by an extern op or the caller, maybe through views
            return n in outputs or any(_extern(u) or (_aliases(u) and read_in_memory(u)) for u in n.users)

        self.realized = {n for n in gm.graph.nodes if _extern(n) or read_in_memory(n)}

    def run_node(self, n: torch.fx.Node) -> Any:
        from memsweep.measure.kernels import trackers

        if n.op != "call_function" or n in self.realized:
            return super().run_node(n)
        live = trackers()
        for tracker in live:
            tracker.hold_peaks += 1
        try:
            out = super().run_node(n)
            made = [t for t in torch.utils._pytree.tree_leaves(out)
                    if isinstance(t, Tensor) and not _is_view_of_input(t, n, self.env)]
            for tracker in live:
                for t in made:
                    tracker.forget(t)
        finally:
            for tracker in live:
                tracker.hold_peaks -= 1
                tracker._update_peaks()
        return out


def _aliases(node: torch.fx.Node) -> bool:
    """Whether the op returns a view of its input (view, transpose, ...: no memory of its own)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and bool(schema.returns) and \
        schema.returns[0].alias_info is not None and not schema.returns[0].alias_info.is_write


def _is_view_of_input(t: Tensor, n: torch.fx.Node, env: dict) -> bool:
    """Whether `t` shares storage with a value the node read (a view: nothing new to drop)."""
    key = t.untyped_storage()._cdata
    for a in n.all_input_nodes:
        v = env.get(a)
        for x in torch.utils._pytree.tree_leaves(v):
            if isinstance(x, Tensor) and x.untyped_storage()._cdata == key:
                return True
    return False


def _capture(slot: list):
    def compiler(gm: torch.fx.GraphModule, example_inputs: Any):
        slot.append(gm)
        gm.meta = {}  # no example values kept beyond the trace
        def run(args: list) -> Any:  # boxed: AOTAutograd passes one list it may clear
            return FusedRun(gm).run(*args)

        run._boxed_call = True
        return run
    return compiler


class CompiledGraphs(torch.autograd.Function):
    """Run a traced forward graph on its inputs; save what it returns beyond the output; the
    backward graph turns those and the output's gradient into the inputs' gradients."""

    @staticmethod
    def forward(ctx, graphs: _Graphs, *inputs: Tensor) -> Tensor:
        outs = FusedRun(graphs.forward).run(*inputs)
        out, saved = outs[0], outs[graphs.outputs:]
        tensors = [s for s in saved if isinstance(s, Tensor)]
        ctx.others = [None if isinstance(s, Tensor) else s for s in saved]
        ctx.save_for_backward(*tensors)
        ctx.graphs, ctx.n_inputs = graphs, len(inputs)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        tensors = iter(ctx.saved_tensors)
        saved = [next(tensors) if s is None else s for s in ctx.others]
        grads = FusedRun(ctx.graphs.backward).run(*saved, grad.contiguous())
        grads = list(grads) + [None] * (ctx.n_inputs - len(grads))
        return (None, *grads[:ctx.n_inputs])


class Compiler:
    """Traces a function of tensors once per key (its structure and shapes) and runs its graphs."""

    def __init__(self) -> None:
        self.graphs: dict[tuple, _Graphs] = {}

    def run(self, key: tuple, fn, inputs: list[Tensor], trace_only: bool = False) -> Tensor | None:
        key = (*key, tuple((t.shape, t.dtype, t.requires_grad) for t in inputs))
        graphs = self.graphs.get(key)
        if graphs is None:
            graphs = self.graphs[key] = _trace(fn, inputs)
        return None if trace_only else CompiledGraphs.apply(graphs, *inputs)

    def prepare(self, block: torch.nn.Module, x: Tensor, rope: tuple[Tensor, Tensor] | None,
                mask: Tensor | None) -> None:
        """Trace the block now (outside a checkpoint, whose saved-tensor hooks must not see the trace)."""
        self(block, x, rope, mask, trace_only=True)

    def module(self, key: tuple, module: torch.nn.Module, call, tensors: list[Tensor],
               trace_only: bool = False) -> Tensor | None:
        """`call(*tensors)`, which runs `module`, compiled: the module's parameters and buffers
        (a RoPE cache) enter the graph as inputs, not constants, so one trace serves every module
        of the same structure."""
        from torch.nn.utils.stateless import _reparametrize_module

        names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        state = [p for _, p in module.named_parameters()] + [b for _, b in module.named_buffers()]

        def run(*args: Tensor) -> Tensor:
            with _reparametrize_module(module, dict(zip(names, args[:len(names)]))):
                return call(*args[len(names):])

        return self.run(key, run, [*state, *tensors], trace_only)

    def __call__(self, block: torch.nn.Module, x: Tensor, rope: tuple[Tensor, Tensor] | None,
                 mask: Tensor | None, trace_only: bool = False) -> Tensor | None:
        """A block (measure/models.Block) on x, compiled on its own, as torchtitan and torchtune do."""
        has_rope, has_mask = rope is not None, mask is not None

        def call(xx: Tensor, *rest: Tensor) -> Tensor:
            r = (rest[0], rest[1]) if has_rope else None
            return block(xx, r, None, 0, rest[-1] if has_mask else None)

        tensors = [x, *(rope or ()), *([mask] if has_mask else [])]
        return self.module(("block", type(block.mlp).__name__, block.local, has_rope, has_mask), block, call, tensors,
                           trace_only)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The mean cross-entropy of fp32-upcast logits, compiled (torchtune's compile_loss)."""
        def run(lg: Tensor, tg: Tensor) -> Tensor:
            return torch.nn.functional.cross_entropy(lg.float().flatten(0, 1), tg.flatten())

        return self.run(("loss",), run, [logits, targets])


def _trace(fn, inputs: list[Tensor]) -> _Graphs:
    from torch._functorch.aot_autograd import aot_function
    from torch._guards import detect_fake_mode

    fw: list = []
    bw: list = []
    compiled = aot_function(fn, fw_compiler=_capture(fw), bw_compiler=_capture(bw),
                            partition_fn=_partitioner(), decompositions=_decompositions())
    fake = detect_fake_mode(inputs)
    with _disable_current_modes():
        mode = fake if fake is not None else torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            args = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).requires_grad_(t.requires_grad)
                    for t in inputs]
            compiled(*args).sum().backward()
    graphs = _Graphs()
    graphs.forward, graphs.backward = fw[0], bw[0]
    graphs.outputs = 1
    return graphs


class InductorCompiler:
    """On a GPU (`measure=cuda`): each block and the loss through `torch.compile` itself, Inductor's
    generated kernels and memory plan, where the trace (`Compiler`) models them."""

    def __init__(self) -> None:
        self.blocks: dict[int, Any] = {}
        self._loss = None

    def prepare(self, block: torch.nn.Module, x: Tensor, rope, mask) -> None:
        """(Nothing to trace ahead: torch.compile compiles on the first call.)"""

    def __call__(self, block: torch.nn.Module, x: Tensor, rope, mask) -> Tensor:
        compiled = self.blocks.get(id(block))
        if compiled is None:
            compiled = self.blocks[id(block)] = torch.compile(block)
        return compiled(x, rope, None, 0, mask)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self._loss is None:
            def cross_entropy(lg: Tensor, tg: Tensor) -> Tensor:
                return torch.nn.functional.cross_entropy(lg.float().flatten(0, 1), tg.flatten())

            self._loss = torch.compile(cross_entropy)
        return self._loss(logits, targets)
