"""Hydra glue: the only package that sees Hydra or OmegaConf."""
