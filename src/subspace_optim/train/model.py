"""The model: transformers' LlamaForCausalLM built from a config (nothing downloaded) or
loaded from a local checkpoint directory; optional INT8 weights."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch

from ..nn import quantize_linear_layers
from .config import ConfigError, RunConfig
from .deps import require


def build_model(cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
    transformers = require("transformers")
    mc = cfg.model_config
    if mc.pretrained:
        if not Path(mc.pretrained).is_dir():
            raise ConfigError(f"model_config.pretrained: {mc.pretrained} is not a directory")
        model = transformers.LlamaForCausalLM.from_pretrained(mc.pretrained)
    else:
        if mc.hidden_size % mc.num_attention_heads:
            raise ConfigError(
                f"model_config: hidden_size {mc.hidden_size} is not divisible by "
                f"num_attention_heads {mc.num_attention_heads}"
            )
        config = transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=mc.hidden_size,
            intermediate_size=mc.intermediate_size,
            num_hidden_layers=mc.num_hidden_layers,
            num_attention_heads=mc.num_attention_heads,
            num_key_value_heads=mc.num_key_value_heads or mc.num_attention_heads,
            max_position_embeddings=mc.max_position_embeddings,
            rms_norm_eps=mc.rms_norm_eps,
            tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(config)
    if cfg.training.int8_weights:
        quantize_linear_layers(model, list(cfg.optimizer.target_modules))
    if cfg.training.activation_checkpointing:
        # transformers 5 renamed the switch; older releases only have the first name.
        enable = getattr(model, "activation_checkpointing_enable", None) or \
            model.gradient_checkpointing_enable
        enable()
    return model


def param_groups(model: torch.nn.Module, cfg: RunConfig) -> list[dict]:
    """The library's ``param_groups``: the linear layers ``optimizer.target_modules``
    matches, projected with ``optimizer.group``'s keys (a mapping of patterns adds its own);
    norms and biases without weight decay; everything else full rank. Without any group
    key nothing is projected: one full-rank group."""
    from ..named_groups import param_groups as named_param_groups

    targets = cfg.optimizer.target_modules
    keyed = isinstance(targets, dict) and all(isinstance(v, dict) and "rank" in v or
                                              isinstance(v, (int, float))
                                              for v in targets.values())
    if not cfg.optimizer.group and not keyed:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    try:
        return named_param_groups(model, targets, require_rank=False, **cfg.optimizer.group)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"optimizer.target_modules: {error}") from None


def foreign_optimizer(name: str) -> type:
    """The optimizer class ``module:Class`` of another installed package (a peer compared
    with this library's), or a ``ConfigError`` that says what is missing."""
    import importlib

    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"optimizer.name={name!r}: cannot import {module_name!r} ({error}); "
                          "install the package that provides it") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"optimizer.name={name!r}: {module_name} has no optimizer class "
                          f"{class_name!r}")
    return cls


def check_optimizer_config(cfg: RunConfig) -> None:
    """Build the configured optimizer on a small stand-in model, so that a bad class name,
    group key or value is a ``ConfigError`` before any data or model is prepared."""
    targets = cfg.optimizer.target_modules
    ranks = [cfg.optimizer.group.get("rank")]
    if isinstance(targets, dict):
        ranks += [v.get("rank") if isinstance(v, dict) else v for v in targets.values()]
    size = max([r for r in ranks if isinstance(r, int) and not isinstance(r, bool)] or [8]) + 1
    names = list(targets) if isinstance(targets, dict) else list(targets) or ["proj"]
    stand_in = torch.nn.ModuleDict({
        "".join(c for c in name if c.isalnum() or c == "_") or f"m{i}":
            torch.nn.Linear(size, size) for i, name in enumerate(names)})
    try:
        with torch.device("meta"):
            stand_in = stand_in.to("meta")
        build_optimizer(stand_in, cfg, check_bnb=False)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"optimizer: {error}") from None


def build_optimizer(model: torch.nn.Module, cfg: RunConfig,
                    check_bnb: bool = True) -> torch.optim.Optimizer:
    import subspace_optim

    oc = cfg.optimizer
    foreign = ":" in oc.name
    cls = foreign_optimizer(oc.name) if foreign else getattr(subspace_optim, oc.name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        from .config import suggest

        known = sorted(n for n in subspace_optim.__all__ if n.endswith(("AdamW", "Adafactor",
                                                                       "Lion", "8bit")))
        raise ConfigError(f"optimizer.name: unknown optimizer {oc.name!r}"
                          f"{suggest(oc.name, known)} (known: {', '.join(known)}; or "
                          "module:Class of another package)")
    # A NaN or inf gradient skips its parameter's update instead of poisoning its state for
    # good; the loop counts and logs such steps (optimizer.kwargs may switch it off).
    kwargs = {"lr": oc.lr, **({} if foreign else {"skip_nonfinite": True}), **oc.kwargs}
    if "weight_decay" in inspect.signature(cls).parameters:
        kwargs["weight_decay"] = oc.weight_decay
    groups = param_groups(model, cfg)
    try:
        with warnings.catch_warnings():
            # A config without rank in its groups asks for full rank (compare's baseline):
            # the optimizer's warning that nothing is projected says what was asked.
            warnings.filterwarnings("ignore", message=".*no param group has 'rank'")
            optimizer = cls(groups, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"optimizer: {error}") from None
    if check_bnb and any(g.get("state_bits") == 8 for g in optimizer.param_groups):
        from ..quant.blockwise import _functional

        _functional()  # 8-bit states need bitsandbytes: say so now, not at the first step
    return optimizer
