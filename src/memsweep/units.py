"""Byte units and bytes per element. GiB is 2**30 bytes, GB is 10**9 bytes."""

from __future__ import annotations

GIB = 2**30
GB = 10**9
MIB = 2**20

# docs/formulas.md F2: fp64 8, fp32 4, fp16 2, bf16 2, int16 2, int8 1, int4 0.5.
DTYPE_BYTES: dict[str, float] = {
    "fp64": 8.0,
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "int16": 2.0,
    "int8": 1.0,
    "int4": 0.5,
}

# The dtypes a sweep may select (`dtype=` key); int8/int4 are weight-only inference formats.
SWEEP_DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")
TRAIN_DTYPES = ("fp32", "fp16", "bf16")


def to_gib(n_bytes: float) -> float:
    return n_bytes / GIB


def to_gb(n_bytes: float) -> float:
    return n_bytes / GB
