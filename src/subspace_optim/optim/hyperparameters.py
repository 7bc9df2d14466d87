"""Tensor hyperparameters: torch accepts a one-element tensor ``lr`` and tensor ``betas``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._validate import scalar_value


def host_hyperparameters(group: dict) -> dict:
    """The group with tensor hyperparameters (torch accepts a one-element tensor ``lr`` and
    tensor ``betas``) read as Python numbers, as torch's non-capturable paths do; the group
    itself when it holds none."""
    betas = group.get("betas")
    tensor_betas = isinstance(betas, (tuple, list)) and any(isinstance(b, Tensor) for b in betas)
    if not isinstance(group["lr"], Tensor) and not tensor_betas:
        return group
    out = dict(group)
    out["lr"] = scalar_value(group["lr"], "lr")
    if tensor_betas:
        out["betas"] = tuple(scalar_value(b, "betas") for b in betas)
    return out


def tensor_lr(group: dict, impl: str, host: dict) -> float | Tensor:
    """The lr the functional API gets: a tensor lr stays a (0-d) tensor only in a compiled
    foreach step, where reading it would break the graph and a float would recompile at
    every scheduler step; elsewhere it is read once, so results equal a float lr's."""
    lr = group["lr"]
    if isinstance(lr, Tensor) and impl == "foreach" and torch.compiler.is_compiling():
        return lr.reshape(())
    return host["lr"]
