"""One call from a model to an optimizer: :func:`build` for scripts, :func:`for_trainer`
for transformers' ``Trainer(optimizer_cls_and_kwargs=...)``.

Both take the optimizer by class or by name, the target modules (``param_groups``'
patterns, a dict for per-pattern keys), and keyword arguments, which go to the constructor
where it takes them (``lr``, ``betas``, ``state_bits``, bitsandbytes' keywords for the 8-bit
classes, ...) and to the projected group otherwise (``rank``, ``update_proj_gap``,
``scale``, ``proj_type``, ``projector``, a projector's keys).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from .named_groups import param_groups
from .optim.base import SubspaceOptimizer
from .optim.groups import near_miss


def optimizer_class(optimizer: str | type) -> type[SubspaceOptimizer]:
    """The class named ``optimizer`` (or ``optimizer`` itself), with a "did you mean" for a
    near miss of a name."""
    import subspace_optim

    if isinstance(optimizer, type):
        if not issubclass(optimizer, SubspaceOptimizer):
            raise TypeError(f"{optimizer.__name__} is not an optimizer of subspace_optim")
        return optimizer
    names = sorted(n for n in subspace_optim.__all__
                   if isinstance(getattr(subspace_optim, n), type)
                   and issubclass(getattr(subspace_optim, n), SubspaceOptimizer)
                   and n != "SubspaceOptimizer")
    if optimizer not in names:
        close = near_miss(optimizer, names) or next(
            (n for n in names if n.lower() == str(optimizer).lower()), None)
        hint = f"did you mean {close!r}? " if close else ""
        raise ValueError(f"unknown optimizer {optimizer!r}: {hint}the classes are "
                         f"{', '.join(names)}")
    return getattr(subspace_optim, optimizer)


def _constructor_keys(cls: type) -> set[str]:
    keys: set[str] = set()
    for klass in cls.__mro__:
        if klass is SubspaceOptimizer or not issubclass(klass, SubspaceOptimizer):
            break
        signature = inspect.signature(klass.__init__)
        keys |= {n for n, p in signature.parameters.items()
                 if n not in ("self", "params") and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                              p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return keys


def build(model: nn.Module, optimizer: str | type,
          target_modules: str | Iterable[str] | Mapping = "all-linear", *,
          no_decay: bool = True, **keys: Any) -> SubspaceOptimizer:
    """The optimizer ``optimizer`` (a class or its name, e.g. ``"GaLoreAdamW"``) over every
    trainable parameter of ``model``, the linear layers matched by ``target_modules``
    projected (see ``subspace_optim.param_groups``). ``keys``: constructor arguments
    (``lr``, ``weight_decay``, ...) and group keys (``rank``, ``update_proj_gap``, ...).
    Norms and biases get no weight decay, as in transformers' Trainer (``no_decay=False``
    gives them the optimizer's)::

        optimizer = subspace_optim.build(model, "GaLoreAdamW", ["self_attn", "mlp"],
                                         rank=128, update_proj_gap=200, scale=0.25, lr=1e-2)
    """
    cls = optimizer_class(optimizer)
    takes = _constructor_keys(cls)
    constructor = {k: v for k, v in keys.items() if k in takes}
    group = {k: v for k, v in keys.items() if k not in takes}
    groups = param_groups(model, target_modules, no_decay=no_decay, **group)
    return cls(groups, **constructor)


class TrainerOptimizer:
    """What :func:`for_trainer` puts in ``optimizer_cls_and_kwargs``: a factory, which the
    Trainer calls with the model (it calls ``factory()(model, **kwargs)`` for anything that
    is not an optimizer class). Holds everything itself, so the kwargs dict the Trainer
    receives (and mutates) is empty and the factory can be reused."""

    def __init__(self, optimizer: type, target_modules: Any, keys: dict[str, Any]) -> None:
        self.optimizer = optimizer
        self.target_modules = target_modules
        self.keys = keys

    def __call__(self) -> Callable[..., SubspaceOptimizer]:
        return self._build  # the Trainer instantiates the "class", then calls that

    def _build(self, model: nn.Module, **kwargs: Any) -> SubspaceOptimizer:
        return build(model, self.optimizer, self.target_modules, **{**self.keys, **kwargs})

    def __repr__(self) -> str:
        return (f"TrainerOptimizer({self.optimizer.__name__}, "
                f"target_modules={self.target_modules!r}, {self.keys})")


def for_trainer(args: Any, optimizer: str | type,
                target_modules: str | Iterable[str] | Mapping = "all-linear",
                **keys: Any) -> tuple[TrainerOptimizer, dict]:
    """``optimizer_cls_and_kwargs`` for transformers' ``Trainer``, with the
    ``TrainingArguments`` ``args``' learning rate, weight decay and (for AdamW and Lion)
    Adam betas and epsilon, as the Trainer's own ``optim=`` choices take them::

        args = TrainingArguments(..., learning_rate=1e-3, weight_decay=0.01)
        trainer = Trainer(model, args, optimizer_cls_and_kwargs=subspace_optim.for_trainer(
            args, "GaLoreAdamW", ["self_attn", "mlp"], rank=128, update_proj_gap=200))

    ``keys`` as for :func:`build` (they win over ``args``'). The Trainer's scheduler then
    drives the learning rate as for any optimizer."""
    cls = optimizer_class(optimizer)
    takes = _constructor_keys(cls)
    from_args = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if cls.rule_name in ("adamw", "lion") and "betas" in takes:
        from_args["betas"] = (args.adam_beta1, args.adam_beta2)
    if cls.rule_name == "adamw" and "eps" in takes:
        from_args["eps"] = args.adam_epsilon
    if "relative_step" in takes:  # Adafactor at the Trainer's lr, as its optim="adafactor"
        from_args.update(relative_step=False, scale_parameter=False)
    from_args = {k: v for k, v in from_args.items() if k in takes}
    return TrainerOptimizer(cls, target_modules, {**from_args, **keys}), {}
