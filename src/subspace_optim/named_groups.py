"""Param groups from module names, for callers that take a list of groups (any
``Optimizer(params)``; :func:`subspace_optim.build` and :func:`subspace_optim.for_trainer`
call it).

Patterns follow transformers' ``optim_target_modules`` (``check_target_module_exists``):

* a string is a regular expression that must match the whole module name
  (``r".*\\.(q|v)_proj"``; a bare ``"attn"`` matches only a module named ``attn``);
* a list holds names, each matching a module whose name equals it, contains it, or that it
  matches as a regular expression (``["self_attn", "mlp"]``);
* ``"all-linear"`` (or ``"all_linear"``) is every linear layer, except the output head and
  embeddings (where transformers' GaLore path also projects ``lm_head``, this follows PEFT's
  ``"all-linear"``: the head is as large as an embedding and is not a layer GaLore
  projects);
* a dict maps such patterns to the keys of their own projected group, or to a rank:
  ``{"self_attn": {"rank": 4}, "mlp": 16}`` (a module matched by several patterns goes to
  the first).

Only linear layers' weights are projected; embeddings, the output head (tied or not), norms
and biases stay in full-rank groups. Frozen parameters (``requires_grad=False``: PEFT's base
weights) are left out of every group. Norm weights and biases go to a group with
``weight_decay`` 0, as transformers' Trainer groups them (``no_decay=False`` keeps them with
the other full-rank parameters). A matrix whose smaller dimension is at most the rank
(LoRA's adapter matrices at rank r) would keep more state projected than AdamW does: it
stays full rank, with a warning naming it. ``rank`` may be a fraction in (0, 1): each
matrix's rank is that fraction of its smaller dimension (rounded, at least 1), one group
per resulting rank.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from .nn import GrassLinear, Int8Linear
from .projectors.base import matrix_shape

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Int8Linear, GrassLinear)
ALL_LINEAR = ("all-linear", "all_linear")
NEVER = ("lm_head",)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
                                           nn.modules.batchnorm._NormBase)


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def matches(patterns: str | list[str], name: str) -> bool:
    """transformers' rule (module docstring) for one module name."""
    if isinstance(patterns, str):
        return patterns in ALL_LINEAR or _fullmatch(patterns, name)
    return (name in patterns or any(p in name for p in patterns)
            or any(_fullmatch(p, name) for p in patterns))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()


# transformers' Trainer.get_decay_parameter_names: these names (lower-cased) are exempt.
NO_DECAY_PATTERNS = tuple(re.compile(p) for p in (
    r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"))


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters the Trainer exempts from weight decay: those of
    normalisation layers, biases, and names that say norm (``Trainer.
    get_decay_parameter_names``'s rule)."""
    out = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if _is_norm(module) or any(p.search(full.lower()) for p in NO_DECAY_PATTERNS):
                out.add(full)
    return out


def _targets(target_modules) -> list[tuple[str | list[str], dict[str, Any]]]:
    """``[(patterns, group keys)]`` from any accepted form of ``target_modules``."""
    if isinstance(target_modules, Mapping):
        out = []
        for pattern, keys in target_modules.items():
            if not isinstance(pattern, str):
                raise TypeError(f"target_modules: a dict's keys are patterns (strings), got "
                                f"{pattern!r}")
            if isinstance(keys, (int, float)) and not isinstance(keys, bool):
                keys = {"rank": keys}
            if not isinstance(keys, Mapping):
                raise TypeError(f"target_modules[{pattern!r}] must be a rank or a dict of group "
                                f"keys, got {keys!r}")
            out.append(([pattern], dict(keys)))
        return out
    if isinstance(target_modules, str):
        return [(target_modules, {})]
    patterns = list(target_modules) if isinstance(target_modules, Iterable) else None
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"target_modules must be a string, a list of strings or a dict of "
                        f"patterns to group keys, got {target_modules!r}")
    return [(patterns, {})]


def _rank_of(rank: Any, shape: tuple[int, int]) -> int:
    if isinstance(rank, float) and 0 < rank < 1:
        return max(1, round(rank * min(shape)))
    return rank


def param_groups(model: nn.Module, target_modules: str | Iterable[str] | Mapping,
                 *, no_decay: bool = True, require_rank: bool = True,
                 **group_keys) -> list[dict]:
    """Param groups for ``model``: the full-rank parameters (those exempt from weight decay
    in a group of their own with ``weight_decay`` 0, unless ``no_decay=False``), then one
    projected group per pattern of a dict (or one for a string or list) with
    ``group_keys`` (e.g. ``rank=128, update_proj_gap=200, scale=0.25``) updated by the
    pattern's own. Empty groups are left out. See the module docstring for the patterns,
    frozen parameters, small matrices and a fractional rank. ``require_rank=False`` makes
    the matched weights a group of their own without ``rank`` (a full-rank baseline with
    their own keys, e.g. another lr)."""
    targets = _targets(target_modules)
    for _, keys in targets:
        if require_rank and "rank" not in {**group_keys, **keys}:
            raise ValueError("param_groups needs rank=... (the projected group's rank); "
                             "without it the optimizer trains every parameter full rank")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = {id(m.weight) for m in model.modules()
                if isinstance(m, nn.Embedding) and hasattr(m, "weight")}
    if output is not None and getattr(output, "weight", None) is not None:
        excluded.add(id(output.weight))
    # (patterns index, rank) -> parameters; a fractional rank splits a pattern's matrices.
    projected: dict[tuple[int, Any], list] = {}
    seen: set[int] = set()
    too_small: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, LINEAR_TYPES) or any(n in name.split(".") for n in NEVER):
            continue
        weight = getattr(module, "weight", None)
        if weight is None or id(weight) in excluded or id(weight) in seen:
            continue
        trainable = weight.requires_grad or isinstance(module, Int8Linear)
        for index, (patterns, keys) in enumerate(targets):
            if not matches(patterns, name):
                continue
            seen.add(id(weight))
            if not trainable:
                break  # frozen: in no group
            shape = matrix_shape(weight.shape)
            rank = _rank_of({**group_keys, **keys}.get("rank"), shape)
            if isinstance(rank, int) and rank >= min(shape):
                too_small.append(f"{name} {tuple(weight.shape)}")
                seen.discard(id(weight))  # full rank, with the rest
                break
            projected.setdefault((index, rank), []).append(weight)
            break
    if not projected:
        linear = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)][:5]
        what = [p for p, _ in targets]
        if too_small:
            raise ValueError(f"every matrix matched by {what!r} has a dimension at most the "
                             f"rank ({', '.join(too_small[:3])}): nothing would be projected")
        raise ValueError(f"no trainable linear layer's name matches {what!r}; linear layers "
                         f"of this model include {linear}")
    if too_small:
        warnings.warn(
            f"param_groups: {len(too_small)} matched matrices have a dimension at most the "
            f"rank and stay full rank (projected, they would keep more state than AdamW): "
            f"{', '.join(too_small[:5])}{' ...' if len(too_small) > 5 else ''}",
            UserWarning, stacklevel=2)
    exempt = no_decay_names(model) if no_decay else set()
    rest, quiet, kept = [], [], set(seen)
    for name, p in model.named_parameters():
        if id(p) in kept or not p.requires_grad:
            continue
        (quiet if name in exempt else rest).append(p)
        kept.add(id(p))
    groups = []
    if rest:
        groups.append({"params": rest})
    if quiet:
        groups.append({"params": quiet, "weight_decay": 0.0})
    for (index, rank), params in projected.items():
        group = {"params": params, **group_keys, **targets[index][1]}
        if rank is not None:
            group["rank"] = rank
        groups.append(group)
    return groups
