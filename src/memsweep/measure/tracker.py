"""Live tensor-storage bytes, by category and by phase, seen from inside PyTorch's dispatcher.

`StorageTracker` is a `TorchDispatchMode`: every op's output storages are counted when they
first appear and uncounted when their storage dies (a weakref finalizer). Under `FakeTensorMode`
the same code runs without allocating anything, so the peak of a 70B training step is exact at
the tensor level and costs no memory; on real CPU tensors it counts the same storages, which is
how the `cpu` backend proves `fake` right.

Every storage carries a category (weights, gradients, optimizer, activations, kv_cache): the
category current when it was allocated, changed later for gradients (a post-accumulate-grad hook
re-tags them). At each new peak the per-category totals are copied, so the breakdown at the peak
costs O(categories) per op, not O(live tensors).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "kv_cache")


@dataclass
class Snapshot:
    """Bytes by category at one moment."""

    by_category: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    @property
    def total(self) -> int:
        return sum(self.by_category.values())


def _inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a wrapper subclass (DTensor, torchao's NF4Tensor) holds its data in."""
    inner = (getattr(tensor, name) for name in tensor.__tensor_flatten__()[0])
    return [t for t in inner if isinstance(t, torch.Tensor)]


class StorageTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[int, str]] = {}  # storage key -> (bytes, category)
        self.current = Snapshot()
        self.peak = Snapshot()
        self.phase_peaks: dict[str, int] = {}
        self.phase_breakdowns: dict[str, dict[str, int]] = {}
        self.marks: dict[str, dict[str, int]] = {}
        self.category = "activations"
        self.phase = "setup"
        self.hold_peaks = 0  # > 0 inside one fused kernel's ops (measure/kernels.one_kernel)
        self._forgotten: set[int] = set()  # storages not counted until they die (`forget`)
        self.see_through: tuple[type, ...] = ()  # subclasses whose ops run below the tracker (DTensor)
        self.ignoring = False  # inside bookkeeping that allocates nothing on a GPU (`ignored`)

    # --- bookkeeping ---------------------------------------------------------------------

    @staticmethod
    def _key(storage: torch.UntypedStorage) -> int:
        return storage._cdata  # the StorageImpl address: unique while the storage lives

    def track(self, tensor: torch.Tensor, category: str | None = None) -> None:
        """Count a tensor's storage (once); tensors made before the mode was entered need this.
        A wrapper subclass (torchao's NF4Tensor) has no storage of its own: its inner tensors'."""
        if is_traceable_wrapper_subclass(tensor):
            for inner in _inner_tensors(tensor):
                self.track(inner, category)
            return
        storage = tensor.untyped_storage()
        key = self._key(storage)
        if key in self._live or key in self._forgotten:
            return
        nbytes = storage.nbytes()
        cat = category or self.category
        self._live[key] = (nbytes, cat)
        self.current.by_category[cat] += nbytes
        weakref.finalize(storage, self._died, key)
        self._update_peaks()

    def adopt(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Count what existed before tracking began: weights, buffers, gradients, optimizer state."""
        for p in model.parameters():
            self.track(p, "weights")
            if p.grad is not None:
                self.track(p.grad, "gradients")
        for b in model.buffers():
            self.track(b, "weights")
        for state in (optimizer.state.values() if optimizer is not None else ()):
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    self.track(v, "optimizer")

    def retag(self, tensor: torch.Tensor, category: str) -> None:
        """Move a live storage to another category (a gradient made by an autograd op). A wrapper
        subclass (DTensor: a tensor-parallel gradient): its inner tensors'."""
        if is_traceable_wrapper_subclass(tensor):
            for inner in _inner_tensors(tensor):
                self.retag(inner, category)
            return
        key = self._key(tensor.untyped_storage())
        if key not in self._live:
            self.track(tensor, category)
            return
        nbytes, old = self._live[key]
        self._live[key] = (nbytes, category)
        self.current.by_category[old] -= nbytes
        self.current.by_category[category] += nbytes

    def forget(self, tensor: torch.Tensor) -> None:
        """Stop counting a storage, for as long as it lives: memory that is not the device's (a
        host copy of an offloaded activation, made by a device op under the trace), or a value a
        compiled kernel never writes out (measure/compiled.py)."""
        key = self._key(tensor.untyped_storage())
        if key in self._live:
            self._forgotten.add(key)
        self._free(key)

    def resized(self, storage: torch.UntypedStorage) -> None:
        """A live storage changed size in place (`UntypedStorage.resize_`): FSDP2 frees a
        parameter's unsharded storage with `resize_(0)` after its forward and backward and
        re-allocates it with `resize_(n)` before the next all-gather; the storage never dies, so
        a tracker that only counted births and deaths would keep every layer gathered."""
        key = self._key(storage)
        if key in self._forgotten:
            return
        entry = self._live.get(key)
        if entry is None:
            if storage.nbytes():
                self._live[key] = (0, self.category)
                weakref.finalize(storage, self._died, key)
                entry = self._live[key]
            else:
                return
        nbytes, cat = entry
        self._live[key] = (storage.nbytes(), cat)
        self.current.by_category[cat] += storage.nbytes() - nbytes
        self._update_peaks()

    @contextmanager
    def counting_resizes(self) -> Iterator[None]:
        """Count `UntypedStorage.resize_` while inside (it is a storage method, below the
        dispatcher, so no TorchDispatchMode sees it; torch's own MemTracker patches it the same
        way: torch/distributed/_tools/mem_tracker.py)."""
        original = torch.UntypedStorage.resize_

        def resize_(storage: torch.UntypedStorage, size: int):
            out = original(storage, size)
            self.resized(storage)
            return out

        with mock.patch.object(torch.UntypedStorage, "resize_", resize_):
            yield

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)  # None: forgotten
        if entry is not None:
            self.current.by_category[entry[1]] -= entry[0]

    def _died(self, key: int) -> None:
        self._free(key)
        self._forgotten.discard(key)

    def _update_peaks(self) -> None:
        if self.hold_peaks:
            return
        total = self.current.total
        if total > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = total
            self.phase_breakdowns[self.phase] = dict(self.current.by_category)
        if total > self.peak.total:
            self.peak = Snapshot(dict(self.current.by_category))

    def reset_peak(self) -> None:
        """Start a new measurement window from what is alive now (e.g. before the 2nd step)."""
        self.peak = Snapshot(dict(self.current.by_category))
        self.phase_peaks = {}
        self.phase_breakdowns = {}

    def mark(self, name: str) -> None:
        """Remember what is alive now, by category (e.g. the saved activations after forward)."""
        self.marks[name] = dict(self.current.by_category)

    @contextmanager
    def ignored(self) -> Iterator[None]:
        """Ops in here make no device memory (DTensor's shape propagation, which runs the op on
        fake tensors of the global shape) and are not counted."""
        with mock.patch.object(self, "ignoring", True):
            yield

    @contextmanager
    def section(self, phase: str, category: str) -> Iterator[None]:
        """Attribute allocations in this block to `phase` and `category`."""
        saved = self.phase, self.category
        self.phase, self.category = phase, category
        self._update_peaks()
        try:
            yield
        finally:
            self.phase, self.category = saved

    # --- the dispatch hook ---------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.see_through and any(issubclass(t, self.see_through) for t in types):
            # a DTensor op: let its own dispatch run and see the ops on its local tensors (the
            # temporaries inside, e.g. loss_parallel's cross-entropy, would be invisible here)
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if self.ignoring:
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out
