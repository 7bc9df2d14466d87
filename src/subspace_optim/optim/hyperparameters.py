"""Tensor hyperparameters: torch accepts a one-element tensor ``lr`` and tensor ``betas``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._validate import scalar_value


def host_hyperparameters(group: dict) -> dict:
    """The group with tensor hyperparameters (torch accepts a one-element tensor ``lr`` and
    tensor ``betas``) read as Python numbers, as torch's non-capturable paths do; the group
    itself when it holds none. Inside ``torch.compile`` a tensor ``lr`` stays a tensor (read
    on the host, it would break the graph; a float from it would recompile at every
    scheduler step): the bodies that take it as a tensor (foreach) use it so."""
    betas = group.get("betas")
    tensor_betas = isinstance(betas, (tuple, list)) and any(isinstance(b, Tensor) for b in betas)
    tensor_lr = isinstance(group["lr"], Tensor)
    if not tensor_lr and not tensor_betas:
        return group
    out = dict(group)
    if not (tensor_lr and torch.compiler.is_compiling()):
        out["lr"] = scalar_value(group["lr"], "lr")
    if tensor_betas:
        out["betas"] = tuple(scalar_value(b, "betas") for b in betas)
    return out


def tensor_lr(group: dict, impl: str, host: dict) -> float | Tensor:
    """The lr the functional API gets: a tensor lr stays a (0-d) tensor only in a compiled
    foreach step, where reading it would break the graph and a float would recompile at
    every scheduler step; elsewhere it is read once, so results equal a float lr's."""
    lr = group["lr"]
    if not torch.compiler.is_compiling():
        return host["lr"]
    if isinstance(lr, Tensor):
        if impl == "foreach":
            return lr.reshape(())
        return scalar_value(lr, "lr")  # reference and fused bodies take a host number
    if impl == "foreach":
        # A float lr as a tensor too: the compiler traces a float that only enters tensor
        # arithmetic as a graph input, but one that reaches a GEMM's alpha is a constant of
        # the graph, and a scheduler's every change would recompile it.
        return torch.ones((), dtype=torch.float64) * lr
    return lr
