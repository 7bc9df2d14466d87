"""Param groups from module names, for callers that take a list of groups (transformers'
``Trainer(optimizer_cls_and_kwargs=...)``, or any ``Optimizer(params)``).

The patterns follow transformers' ``optim_target_modules``: a string is a regular
expression matched against the whole module name, or else a substring of it; a list holds
such strings; ``"all-linear"`` is every linear layer. Only linear layers' weights are
projected: embeddings, the output head (``lm_head``, tied or not), norms and biases stay in
the full-rank group.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .nn import GrassLinear, Int8Linear

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Int8Linear, GrassLinear)
ALL_LINEAR = "all-linear"
NEVER = ("lm_head",)


def _matches(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern == ALL_LINEAR:
            return True
        try:
            if re.fullmatch(pattern, name):
                return True
        except re.error:
            pass
        if pattern in name:
            return True
    return False


def param_groups(model: nn.Module, target_modules: str | Iterable[str],
                 **group_keys) -> list[dict]:
    """``[{"params": the rest}, {"params": matched linear weights, **group_keys}]``.

    model: the model whose parameters are grouped (each parameter lands in one group, once
        even when tied).
    target_modules: module-name patterns (see the module docstring), e.g.
        ``["self_attn", "mlp"]``, ``r".*\\.(q|v)_proj"`` or ``"all-linear"``.
    group_keys: keys of the projected group, e.g. ``rank=128, update_proj_gap=200,
        scale=0.25``; ``rank`` is required (without it nothing would be projected).
    """
    if "rank" not in group_keys:
        raise ValueError("param_groups needs rank=... (the projected group's rank); without "
                         "it the optimizer trains every parameter full rank")
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"target_modules must be a string or a list of strings, got "
                        f"{target_modules!r}")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = {id(m.weight) for m in model.modules()
                if isinstance(m, nn.Embedding) and hasattr(m, "weight")}
    if output is not None and getattr(output, "weight", None) is not None:
        excluded.add(id(output.weight))
    projected, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, LINEAR_TYPES) or any(n in name.split(".") for n in NEVER):
            continue
        weight = getattr(module, "weight", None)
        if weight is None or id(weight) in excluded or id(weight) in seen:
            continue
        if _matches(name, patterns):
            projected.append(weight)
            seen.add(id(weight))
    if not projected:
        linear = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)][:5]
        raise ValueError(f"no linear layer's name matches {patterns!r}; linear layers of this "
                         f"model include {linear}")
    rest, kept = [], set(seen)
    for p in model.parameters():
        if id(p) not in kept and p.requires_grad:
            rest.append(p)
            kept.add(id(p))
    return [{"params": rest}, {"params": projected, **group_keys}]
