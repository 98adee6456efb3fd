"""memsweep: sweep, measure and calibrate GPU memory formulas for transformer models."""

__version__ = "0.1.0"
