"""The test registry: one record per registered projector and per public optimizer class.

Modelled on torch's ``OptimizerInfo`` database (torch/testing/_internal/common_optimizers.py):
a record states how to build the thing, its variants and what it supports, and the generic
tests (resume, bad values, dtype and precision, ...) run over every record. A new projector
or optimizer class is tested by adding its record; ``test_registry.py`` fails when one is
missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import subspace_optim as so

STATE_BITS = (None, 32, 16, 8)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ProjectorRecord:
    """A registered projector: its variants (extra group keys, by description), the named
    class that uses it by default, its bad values, its state bound and contract properties."""

    name: str
    named: str
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}})
    # Group keys a short test needs (e.g. a quantisation group that fits small bases).
    small: dict[str, Any] = field(default_factory=dict)
    # Whether the subspace is refreshed every update_proj_gap steps (OSD learns it online).
    periodic_refresh: bool = True
    # Variants that read the group's lr (and so refuse Adafactor's lr=None).
    needs_lr: frozenset[str] = frozenset()
    # (group keys, expected error) for values the projector must refuse.
    bad_values: tuple[tuple[dict[str, Any], str], ...] = ()
    # Bytes of projector state allowed for one m x n fp32 matrix at rank r (right side).
    state_bound: Callable[[int, int, int], float] = lambda m, n, r: 0
    # Properties of the projection P P^T right after a refresh, per variant:
    # "orthonormal" (idempotent, norm-reducing, re-projection onto itself the identity).
    orthonormal: frozenset[str] = frozenset()

    def group(self, variant: str = "default", **keys: Any) -> dict[str, Any]:
        return {"projector": self.name, **self.small, **self.variants[variant], **keys}


@dataclass(frozen=True)
class OptimizerRecord:
    """A public optimizer class: how to build it from param groups and which inner rule and
    state precisions it has."""

    cls: type
    rule: str
    state_bits: tuple[int | None, ...] = STATE_BITS
    # Keyword arguments every test passes (e.g. an lr where the class has none by default).
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Whether groups choose the projector (FloraAdafactor always compresses with Flora).
    any_projector: bool = True
    # Whether its default state precision (8-bit) needs bitsandbytes.
    bnb: bool = False
    # Builds the optimizer from groups and keyword arguments (classes with their own
    # constructor conventions override it).
    build: Callable[..., torch.optim.Optimizer] | None = None

    @property
    def name(self) -> str:
        return self.cls.__name__

    def make(self, groups, **kwargs) -> torch.optim.Optimizer:
        kwargs = {**self.kwargs, **kwargs}
        if self.build is not None:
            return self.build(groups, **kwargs)
        return self.cls(groups, **kwargs)

    @property
    def has_lr(self) -> bool:
        """Whether groups get an lr (Adafactor's default is None: relative steps)."""
        return not (self.rule == "adafactor" and "lr" not in self.kwargs)

    def eps_for(self, dtype: torch.dtype) -> dict[str, Any]:
        """fp16 cannot hold AdamW's eps of 1e-8 (it rounds to 0, and torch's own AdamW turns
        NaN): tests in fp16 use 1e-4, as fp16 users do."""
        if dtype == torch.float16 and self.rule == "adamw":
            return {"eps": 1e-4}
        return {}


def _flora_adafactor(groups, **kwargs):
    # FloraAdafactor compresses only momentum and reads rank from its group or constructor;
    # its groups take no scale or projector.
    for group in groups:
        group.pop("scale", None)
        group.pop("projector", None)
    kwargs.pop("state_bits", None)
    return so.FloraAdafactor(groups, **kwargs)


def _q_galore_bound(m: int, n: int, r: int) -> float:
    elements = r * n
    groups = -(-elements // 256)
    # 4-bit codes, an fp32 scale and a uint8 zero per group, and the lazy-refresh queue.
    return 0.5 * elements + 5 * groups + 5 * 4


ALL_VARIANTS = frozenset({"default", "left", "reverse_std", "rotate", "rotate-fft", "topk"})

PROJECTORS = {
    "galore": ProjectorRecord(
        "galore", "GaLoreAdamW",
        {"default": {}, "left": {"proj_type": "left"},
         "reverse_std": {"proj_type": "reverse_std"}},
        bad_values=(({"proj_type": "full"}, r"Invalid proj_type: 'full'"),
                    ({"scale": 0}, r"Invalid scale: 0")),
        state_bound=lambda m, n, r: 4 * r * n, orthonormal=ALL_VARIANTS),
    "dct": ProjectorRecord(
        "dct", "DCTAdamW",
        {"default": {}, "rotate": {"rotate_subspace": True},
         "rotate-fft": {"rotate_subspace": True, "sim_type": "makhoul"}},
        bad_values=(({"sim_type": "fft"}, r"Invalid sim_type: 'fft'"),
                    ({"rotate_subspace": "yes"}, r"Invalid rotate_subspace: 'yes'")),
        state_bound=lambda m, n, r: 4 * r, orthonormal=ALL_VARIANTS),
    "online_pca": ProjectorRecord(
        "online_pca", "OnlineSubspaceAdamW",
        {"default": {}, "paper": {"osd_variant": "paper"}},
        periodic_refresh=False, needs_lr=frozenset({"paper"}),
        bad_values=(({"osd_variant": "x"}, r"Invalid osd_variant: 'x'"),
                    ({"ortho_penalty": -1.0}, r"Invalid ortho_penalty: -1\.0"),
                    ({"pca_lr_ratio": -2}, r"Invalid pca_lr_ratio: -2")),
        # The basis and its own two AdamW moments.
        state_bound=lambda m, n, r: 3 * 4 * r * n, orthonormal=frozenset({"default", "paper"})),
    "flora": ProjectorRecord(
        "flora", "FloraAdamW",
        bad_values=(({"seed": -1}, r"Invalid seed: -1"), ({"seed": 1.5}, r"Invalid seed: 1\.5")),
        state_bound=lambda m, n, r: 8),
    "grass": ProjectorRecord(
        "grass", "GrassAdamW",
        {"default": {}, "uniform": {"selection": "uniform"}, "topk": {"selection": "topk"}},
        bad_values=(({"selection": "random"}, r"Invalid selection: 'random'"),
                    ({"seed": -3}, r"Invalid seed: -3")),
        # int16 indices, an fp32 scale each, and the seed.
        state_bound=lambda m, n, r: 2 * r + 4 * r + 8, orthonormal=frozenset({"topk"})),
    "apollo": ProjectorRecord(
        "apollo", "ApolloAdamW", {"default": {}, "torch": {"generator": "torch"}},
        bad_values=(({"generator": "numpy"}, r"Invalid generator: 'numpy'"),
                    ({"seed": -1}, r"Invalid seed: -1")),
        # The seed, and ApolloAdamW's limiter norm (one float32).
        state_bound=lambda m, n, r: 8 + 4),
    "q_galore": ProjectorRecord(
        "q_galore", "QGaLoreAdamW", {"default": {}, "8bit": {"quant_n_bit": 8}},
        small={"quant_group_size": 64},
        bad_values=(({"quant_n_bit": 3}, r"Invalid quant_n_bit: 3"),
                    ({"quant_group_size": 0}, r"Invalid quant_group_size: 0"),
                    ({"cos_threshold": 2.0}, r"Invalid cos_threshold: 2\.0"),
                    ({"gamma_proj": 0.5}, r"Invalid gamma_proj: 0\.5"),
                    ({"queue_size": 0}, r"Invalid queue_size: 0"),
                    ({"cos_abs": "no"}, r"Invalid cos_abs: 'no'"),
                    ({"proj_type": "left"}, r"Invalid proj_type: 'left' for projector 'q_galore'")),
        state_bound=_q_galore_bound),
}

OPTIMIZERS = {
    r.name: r for r in [
        OptimizerRecord(so.SubspaceAdamW, "adamw"),
        OptimizerRecord(so.GaLoreAdamW, "adamw"),
        OptimizerRecord(so.GaLoreAdamW8bit, "adamw", bnb=True),
        OptimizerRecord(so.QGaLoreAdamW8bit, "adamw", bnb=True),
        OptimizerRecord(so.DCTAdamW, "adamw"),
        OptimizerRecord(so.OnlineSubspaceAdamW, "adamw"),
        OptimizerRecord(so.FloraAdamW, "adamw"),
        OptimizerRecord(so.GrassAdamW, "adamw"),
        OptimizerRecord(so.QGaLoreAdamW, "adamw"),
        OptimizerRecord(so.SubspaceAdafactor, "adafactor"),
        OptimizerRecord(so.GaLoreAdafactor, "adafactor",
                        kwargs={"lr": 1e-2, "relative_step": False, "scale_parameter": False}),
        OptimizerRecord(so.SubspaceLion, "lion"),
        OptimizerRecord(so.ApolloAdamW, "adamw"),
        OptimizerRecord(so.ApolloMiniAdamW, "adamw"),
        OptimizerRecord(so.FiraAdamW, "adamw"),
        OptimizerRecord(so.FloraAdafactor, "flora_adafactor", state_bits=(None,),
                        kwargs={"lr": 1e-2}, any_projector=False, build=_flora_adafactor),
    ]
}


def public_optimizer_classes() -> set[type]:
    return {obj for name in so.__all__ if isinstance(obj := getattr(so, name), type)
            and issubclass(obj, torch.optim.Optimizer) and obj is not so.SubspaceOptimizer}

