"""Measured memory: reference torch models and the backends that run them (only submodules import torch)."""
