"""Checking a state dict before it is loaded, so that a wrong one is refused with a reason and
the optimizer is left exactly as it was.

``Optimizer.load_state_dict`` trusts what it is given: a galore-torch state dict wipes the
state and fails half-way on its pickled ``projector`` object, another class's state dict
loads silently, a ``torch.optim.AdamW`` one turns projection off (its groups have no
``rank``), and values inside (rank 0, a negative lr) are never looked at. Here everything is
checked first: the structure, the optimizer that wrote it, every group's keys and values
(by the same checks as the constructor), and every parameter's state (its keys, value
types and moment shapes). Only then does anything change.
"""

from __future__ import annotations

import copy
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .base import SubspaceOptimizer

# The top-level key under which this library's state dicts say who wrote them.
EXTRA_KEY = "subspace_optim"
FORMAT = 1
# Group keys of optimizers outside this library (torch's AdamW and its flags), which no
# class here reads: finding them means the state dict came from elsewhere.
FOREIGN_GROUP_KEYS = frozenset({"amsgrad", "decoupled_weight_decay", "nesterov", "dampening",
                                "momentum_decay", "lr_decay", "initial_accumulator_value",
                                "rho", "lambd", "alpha", "t0", "etas", "step_sizes"})
# State keys this library writes besides the rule's moments (``<moment>_absmax`` for 8-bit
# states) and the projector's ``proj_*`` keys.
COMMON_STATE_KEYS = frozenset({"step", "sr_seed", "micro_step", "window_grad",
                               "window_refreshed", "window_skip", "limiter_norm"})
PLAIN_TYPES = (int, float, bool, str, type(None))


def marker(opt: SubspaceOptimizer) -> dict[str, Any]:
    return {"format": FORMAT, "optimizer": type(opt).__name__, "rule": opt.rule_name}


def _refuse(message: str) -> None:
    raise ValueError(f"load_state_dict: {message}; the optimizer was left unchanged")


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, (Tensor, *PLAIN_TYPES)):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(item, where)
        return
    if isinstance(value, dict):
        for item in value.values():
            _check_plain(item, where)
        return
    _refuse(f"{where} holds a {type(value).__name__} object; this library's state is only "
            "tensors and plain values (a galore-torch state dict pickles its projector)")


def _check_structure(state_dict: Any) -> None:
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
            or not isinstance(state_dict.get("param_groups"), list):
        _refuse("not an optimizer state dict (expected a dict with 'state' and "
                "'param_groups')")
    for i, group in enumerate(state_dict["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            _refuse(f"param group {i} is not a dict with a 'params' list")


def _check_writer(opt: SubspaceOptimizer, state_dict: dict) -> bool:
    """Whether the state dict says it was written by this library (by a compatible class)."""
    extra = state_dict.get(EXTRA_KEY)
    if extra is None:
        return False
    if not isinstance(extra, dict) or extra.get("format") != FORMAT:
        _refuse(f"unknown {EXTRA_KEY!r} entry {extra!r}")
    if extra.get("rule") != opt.rule_name:
        _refuse(f"the state dict was saved by {extra.get('optimizer')} (rule "
                f"{extra.get('rule')!r}); {type(opt).__name__} (rule {opt.rule_name!r}) cannot "
                "continue it")
    return True


def _check_group_keys(opt: SubspaceOptimizer, i: int, saved: dict, current: dict,
                      ours: bool) -> None:
    who = type(opt).__name__
    required = set(opt.defaults) - opt.optional_group_keys
    missing = sorted(required - set(saved))
    if missing:
        _refuse(f"param group {i} lacks {missing}, which {who} needs: this is not a state "
                f"dict of {who}")
    foreign = sorted(set(saved) & FOREIGN_GROUP_KEYS)
    if foreign and not ours:
        _refuse(f"param group {i} has {foreign}, keys of another optimizer (e.g. "
                f"torch.optim.AdamW): this is not a state dict of {who}")
    if ("rank" in saved) != ("rank" in current):
        if "rank" in current:
            _refuse(f"param group {i} is projected here (rank {current['rank']}) but not in the "
                    "state dict; loading it would switch projection off (a state dict of a "
                    "plain optimizer?)")
        _refuse(f"param group {i} is projected in the state dict (rank {saved['rank']}) but "
                "not in this optimizer")


def _expected_shapes(opt: SubspaceOptimizer, p: Tensor, group: dict) -> dict[str, tuple]:
    """Moment name -> shape this optimizer would create for ``p`` in ``group`` (meta
    tensors: nothing is allocated)."""
    return opt.expected_state_shapes(p, group)


def _check_state(opt: SubspaceOptimizer, index: int, p: Tensor, group: dict,
                 state: Any) -> None:
    where = f"state of parameter {index} (shape {tuple(p.shape)})"
    if not isinstance(state, dict):
        _refuse(f"{where} is a {type(state).__name__}, not a dict")
    _check_plain(state, where)
    shapes = _expected_shapes(opt, p, group)
    for key, value in state.items():
        if key in COMMON_STATE_KEYS or (isinstance(key, str) and key.startswith("proj_")):
            continue
        base = key[: -len("_absmax")] if isinstance(key, str) and key.endswith("_absmax") else key
        if base not in shapes:
            _refuse(f"{where} has the key {key!r}, which {type(opt).__name__} never writes "
                    "(a state dict of another optimizer?)")
        if base == key and isinstance(value, Tensor) and tuple(value.shape) != shapes[key]:
            _refuse(f"{where}: {key!r} has shape {tuple(value.shape)} where this optimizer "
                    f"keeps {shapes[key]} (a different model, rank or proj_type?)")
    _check_parameter_dtype(opt, p, group, state, where, set(shapes))
    step = state.get("step")
    if step is not None and not (isinstance(step, int) and not isinstance(step, bool)
                                 and step >= 0):
        _refuse(f"{where}: 'step' is {step!r}, not a count >= 0 (this library keeps steps as "
                "Python ints)")


def _check_parameter_dtype(opt: SubspaceOptimizer, p: Tensor, group: dict, state: dict,
                           where: str, moments: set[str]) -> None:
    """Refuse state kept in the parameter's dtype (the rule's moments with
    ``state_bits=None``, the projector's basis) that is of another dtype: the state dict was
    saved from a model of another precision (an fp32 checkpoint into a bf16 model), and the
    first step would fail on mixed dtypes. Every dtype is kept as saved, so it is refused
    rather than cast."""
    if not p.is_floating_point():  # an INT8 weight's codes: its state has its own dtypes
        return
    keys = set(moments) if group.get("state_bits") is None else set()
    if "rank" in group:
        from ..projectors.base import get_projector

        keys |= get_projector(group["projector"]).param_dtype_state_keys
    for key in sorted(keys):
        value = state.get(key)
        if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != p.dtype:
            _refuse(f"{where}: {key!r} is {value.dtype} where the parameter is {p.dtype} "
                    "(the state was saved from a model of another precision). Load it into "
                    f"a model of the precision it was saved from, or start the optimizer "
                    "anew; state_bits=32 keeps moments in float32 whatever the model's dtype")


def prepare_load(opt: SubspaceOptimizer, state_dict: dict) -> tuple[list[dict], dict]:
    """Check ``state_dict`` against ``opt`` and return ``(param_groups, state)`` to install;
    raises ``ValueError`` (and changes nothing) when it does not fit."""
    _check_structure(state_dict)
    ours = _check_writer(opt, state_dict)
    saved_groups = state_dict["param_groups"]
    groups = opt.param_groups
    if len(groups) != len(saved_groups):
        _refuse(f"it has {len(saved_groups)} parameter groups, this optimizer {len(groups)}")
    for i, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(group["params"]) != len(saved["params"]):
            _refuse(f"param group {i} has {len(saved['params'])} parameters in the state dict "
                    f"and {len(group['params'])} here")
    new_groups = []
    for i, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        _check_group_keys(opt, i, saved, group, ours)
        candidate = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
        candidate["params"] = group["params"]
        for key in opt.optional_group_keys & set(opt.defaults):
            # Flags added after a state dict was written: the class's default, as torch's
            # __setstate__ does for its own later flags.
            candidate.setdefault(key, opt.defaults[key])
        if "param_names" in group and "param_names" not in candidate:
            candidate["param_names"] = group["param_names"]
        try:
            opt.check_group(candidate)
        except ValueError as error:
            _refuse(f"param group {i}: {error}")
        new_groups.append(candidate)

    saved_state = state_dict["state"]
    saved_ids = chain.from_iterable(g["params"] for g in saved_groups)
    params = ((p, g) for g in new_groups for p in g["params"])
    host_keys = opt.host_state_keys(new_groups)
    state = {}
    for index, (saved_id, (p, group)) in enumerate(zip(saved_ids, params, strict=True)):
        if saved_id not in saved_state:
            continue
        _check_state(opt, index, p, group, saved_state[saved_id])
        state[p] = {key: _place(value, "cpu" if key in host_keys else p.device)
                    for key, value in saved_state[saved_id].items()}
    return new_groups, state


def _place(value: Any, device: torch.device | str) -> Any:
    """``value`` on ``device``, every tensor keeping its dtype (torch's loader would cast
    floating state to the parameter's dtype: an fp32 basis of a bf16 weight to bf16, integer
    codes to floats). Like torch's, tensors already in place are not copied."""
    if isinstance(value, Tensor):
        return value.to(device=device)
    if isinstance(value, dict):
        return {k: _place(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_place(v, device) for v in value)
    return value
