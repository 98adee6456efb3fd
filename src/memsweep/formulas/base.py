"""What every estimator returns, and the registry that names them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from memsweep.columns import Array, Columns

TERMS = ("weights", "gradients", "optimizer", "activations", "logits", "kv_cache", "overhead", "optimizer_step")
"""Every formula's terms, each a `<term>_bytes` result column. `optimizer` is the optimizer's state
(and fp32 master weights); `optimizer_step` what `optimizer.step()` allocates beside it (foreach
Adam's list of temporaries, ...), nonzero only in a breakdown whose peak is the step (detailed's;
the seed formulas have none). Appended last: columns are a contract, added at the end."""


@dataclass(frozen=True)
class Breakdown:
    """Per-GPU bytes by term, one array element per configuration."""

    weights: Array
    gradients: Array
    optimizer: Array
    activations: Array
    logits: Array
    kv_cache: Array
    overhead: Array
    optimizer_step: Array

    @classmethod
    def of(cls, like: Array, **terms: Array | float) -> Breakdown:
        """Fill missing terms with zeros and broadcast every term to the shape of `like`."""
        zero = np.zeros_like(like, dtype=np.float64)  # shared by the missing terms: never written to
        return cls(**{t: np.asarray(terms[t], dtype=np.float64) + zero if t in terms else zero for t in TERMS})

    @property
    def total(self) -> Array:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits
                + self.kv_cache + self.overhead + self.optimizer_step)

    def select(self, mask: Array, other: Breakdown) -> Breakdown:
        """Element-wise: this breakdown where `mask`, else `other`."""
        return Breakdown(**{t: np.where(mask, getattr(self, t), getattr(other, t)) for t in TERMS})


@dataclass(frozen=True)
class Formula:
    """A named estimator: a pure function of columns and its (calibratable) constants."""

    name: str
    evaluate: Callable[[Columns, Any], Breakdown]
    constants: Any
    source: str

    def __call__(self, c: Columns) -> Breakdown:
        return self.evaluate(c, self.constants)

    def with_constants(self, name: str, **values: float) -> Formula:
        """A variant with some constants replaced (what calibration produces)."""
        return replace(self, name=name, constants=replace(self.constants, **values))

    def constant_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.constants))
