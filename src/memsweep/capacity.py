"""The one capacity definition: what a job, a sweep's `fits` and every planning table may fill.

    capacity = (memory - reserve) x (1 - margin)

- `reserve` (a hardware preset's `reserved_mib`): what the CUDA context, driver and library
  workspaces keep for themselves; never available to tensors.
- `margin` (config key `margin`, default 0.05): room left for allocator fragmentation and cache,
  and for what a formula misses.
- a serving engine (`workload=serve`) takes at most its own budget, `gpu_util` of the memory less
  the reserve (vLLM's `requested_memory`; `engine_budget_bytes`), when that is smaller.

Pure numpy, and a leaf: it imports no other memsweep module but `errors` (the specs check their
margin with it). The sweep calls it with scalars, the planner with arrays.
"""

from __future__ import annotations

import numpy as np

from memsweep.errors import ConfigError

DEFAULT_MARGIN = 0.05
"""Plan to fill at most 95 % of usable memory. PyTorch's caching allocator rounds blocks up
(to 512 B, and 2 MiB segments for large ones) and fragments; 5 % is the usual headroom people
keep (DeepSpeed's estimators print a 1.5x buffer on CPU only; this is the GPU side's)."""


def check_margin(value: object, key: str = "margin") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(key, value, "a number in [0, 1), e.g. 0.05")
    return float(value)


def capacity_bytes(memory_bytes, reserved_bytes, margin: float, gpu_util=None, serve=None):
    """(memory - reserve) x (1 - margin); for serve rows (`serve` true) at most the engine's
    budget `gpu_util` x memory - reserve. Scalars in, float out; arrays in, array out."""
    memory = np.asarray(memory_bytes, dtype=np.float64)
    reserve = np.asarray(reserved_bytes, dtype=np.float64)
    cap = (memory - reserve) * (1.0 - margin)
    if gpu_util is not None and serve is not None:
        engine = engine_budget_bytes(gpu_util, memory, reserve)
        cap = np.where(np.asarray(serve, dtype=bool), np.minimum(cap, engine), cap)
    return float(cap) if np.ndim(cap) == 0 else cap


def engine_budget_bytes(gpu_util: np.ndarray | float, memory_bytes: np.ndarray | float, reserved_bytes: np.ndarray | float) -> np.ndarray:
    """A serving engine's memory: `gpu_util` of the GPU's (vLLM's `requested_memory`, rounded up),
    less the reserve (CUDA context, cuBLAS, NCCL: vLLM's non-torch memory). The sweep's
    `capacity_bytes` and the planner's capacity of a serve case are this."""
    return np.ceil(np.asarray(gpu_util, dtype=np.float64) * memory_bytes) - reserved_bytes
