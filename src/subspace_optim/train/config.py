"""Run configuration: typed sections loaded from YAML, overridden by ``--set key=value``.

Unknown keys and values of the wrong type are errors that name the key and the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

# The package's own configs (installed as package data, so a wheel has them too).
CONFIG_ROOT = Path(str(resources.files("subspace_optim.configs")))


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass
class ModelConfig:
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 344
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    # Grouped-query attention: key/value heads (None: as many as attention heads).
    num_key_value_heads: int | None = None
    # A local Hugging Face checkpoint directory to fine-tune instead of a fresh model.
    pretrained: str | None = None


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | files | hub
    paths: list[str] = field(default_factory=list)  # files: paths or globs (.txt .jsonl .parquet)
    hub_name: str | None = None  # hub: e.g. allenai/c4
    hub_config: str | None = None  # hub: e.g. en
    text_field: str = "text"
    tokenizer: str | None = None  # a local tokenizer directory; None: train a byte-level BPE
    vocab_size: int = 2048
    seq_len: int = 128
    max_train_bytes: int = 4_000_000
    max_val_bytes: int = 400_000
    cache_dir: str | None = None  # default: ~/.cache/subspace_optim


@dataclass
class OptimizerConfig:
    name: str = "GaLoreAdamW"  # any optimizer class of subspace_optim
    lr: float = 0.01
    weight_decay: float = 0.0
    # Linear layers to project: names or patterns (transformers' rule), or a mapping of
    # patterns to their own group keys or rank ({self_attn: {rank: 4}, mlp: 16}).
    target_modules: list[str] | dict[str, Any] = field(
        default_factory=lambda: ["self_attn", "mlp"])
    group: dict[str, Any] = field(default_factory=dict)  # keys of the projected group
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments


@dataclass
class TrainingConfig:
    steps: int = 300
    batch_size: int = 16
    accumulation_steps: int = 1
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    dtype: str = "fp32"  # fp32 | bf16 | autocast | fp64
    layerwise: bool = False
    parallel: str = "none"  # none | ddp | fsdp (the last two under torchrun)
    int8_weights: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    log_every: int = 10


@dataclass
class OutputConfig:
    dir: str = "runs"
    name: str | None = None  # default: <train config name>-<timestamp>


@dataclass
class RunConfig:
    model: str = "tiny"  # configs/model/<name>.yaml, or a path to one
    model_config: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "data.source": ("stdlib", "files", "hub"),
    # fp64: for numerical checks (a distributed run against one process, to rounding).
    "training.dtype": ("fp32", "bf16", "autocast", "fp64"),
    "training.parallel": ("none", "ddp", "fsdp"),
}


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low:g}"


_POSITIVE = _at_least(1)
# Ranges of values the loop divides by, counts with or multiplies gradients by: each
# violation is a ConfigError naming the key, not a ZeroDivisionError deep in a run.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{f"training.{k}": _POSITIVE for k in ("steps", "batch_size", "accumulation_steps",
                                            "eval_every", "eval_batches", "checkpoint_every",
                                            "log_every")},
    "training.warmup_steps": _at_least(0),
    "training.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "training.max_grad_norm": (lambda v: v is None or (math.isfinite(v) and v > 0),
                               "> 0, or null to switch clipping off"),
    "training.seed": _at_least(0),
    "data.seq_len": _POSITIVE,
    # A byte-level BPE starts from 256 byte tokens and one end-of-text token.
    "data.vocab_size": _at_least(257),
    "data.max_train_bytes": _POSITIVE,
    "data.max_val_bytes": _POSITIVE,
    "optimizer.lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "optimizer.weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    **{f"model_config.{k}": _POSITIVE for k in ("hidden_size", "num_hidden_layers",
                                                "num_attention_heads", "intermediate_size",
                                                "max_position_embeddings")},
    "model_config.rms_norm_eps": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
}
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def _check_device(value: str, where: str) -> None:
    import torch

    if value == "auto":
        return
    try:
        device = torch.device(value)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{where}: training.device must be one of {DEVICES}, got {value!r}")


def _check_name(value: str | None, where: str) -> None:
    if value is None:
        return
    path = Path(value)
    if not value or path.is_absolute() or ".." in path.parts:
        raise ConfigError(f"{where}: output.name must be a relative name inside output.dir "
                          f"(no '..', not absolute), got {value!r}")


def check_values(cfg: RunConfig, where: str) -> None:
    """Refuse values the run cannot use (see RANGES), naming the key."""
    for key, (ok, requirement) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"{where}: {key} must be {requirement}, got {value!r}")
    _check_device(cfg.training.device, where)
    _check_name(cfg.output.name, where)
    if cfg.data.source == "files" and not cfg.data.paths:
        raise ConfigError(f"{where}: data.source=files needs data.paths")
    if cfg.data.source == "hub" and not cfg.data.hub_name:
        raise ConfigError(f"{where}: data.source=hub needs data.hub_name")


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        first = None
        for arg in args:  # the first type that takes the value
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as error:
                first = first or error
        raise first
    if hint is Any:
        return value
    if origin is list:
        if isinstance(value, str) and typing.get_args(hint) == (str,):
            value = [value]  # one path or pattern where a list is expected
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, str):
        return value
    raise ConfigError(
        f"{where}: {key} must be {getattr(hint, '__name__', hint)}, got {value!r}"
    )


def _merge(obj: Any, data: dict, prefix: str, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix or 'the file'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            hint = suggest(key, fields)
            raise ConfigError(f"{where}: unknown key {full!r}{hint} (known: {sorted(fields)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{full}.", where)
            continue
        value = _coerce(value, hints[key], full, where)
        if full in CHOICES and value not in CHOICES[full]:
            raise ConfigError(f"{where}: {full} must be one of {CHOICES[full]}, got {value!r}")
        setattr(obj, key, value)


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of keys, got {type(data).__name__}")
    return data


def _resolve(name_or_path: str, kind: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"{kind} config file not found: {path}")
        return path
    candidate = CONFIG_ROOT / kind / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in (CONFIG_ROOT / kind).glob("*.yaml"))
        raise ConfigError(f"unknown {kind} config {name_or_path!r}"
                          f"{suggest(name_or_path, known)} (known: {known})")
    return candidate


def load_config(train: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The run configuration: defaults, then the train config (``configs/train/<name>.yaml``
    or a path; ``default`` when None), then its model config, then ``overrides`` as
    ``section.key=value`` (values parsed as YAML)."""
    import yaml

    cfg = RunConfig()
    train_path = _resolve(train or "default", "train")
    data = _read_yaml(train_path)
    _merge(cfg, data, "", str(train_path))
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            parsed.append((key.strip(), yaml.safe_load(raw)))
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({error})") from None
    for key, value in parsed:  # the model name may itself be overridden
        if key == "model":
            _merge(cfg, {"model": value}, "", "--set")
    model_path = _resolve(cfg.model, "model")
    _merge(cfg.model_config, _read_yaml(model_path), "model_config.", str(model_path))
    if "model_config" in data:
        _merge(cfg, {"model_config": data["model_config"]}, "", str(train_path))
    for key, value in parsed:
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(cfg, nested, "", "--set")
    check_values(cfg, "--set" if parsed else str(train_path))
    return cfg


def load_saved_config(path: Path) -> RunConfig:
    """The resolved configuration a run wrote to its ``config.json`` (for ``--resume``)."""
    if not path.exists():
        raise ConfigError(f"{path} not found: not a run directory of subspace-optim train")
    cfg = RunConfig()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: damaged ({error})") from None
    _merge(cfg, data, "", str(path))
    return cfg


def suggest(name: str, known) -> str:
    """``: did you mean 'x'?`` for a near miss of one of ``known`` (case, one edit), or
    nothing."""
    from ..optim.groups import near_miss

    close = near_miss(name, list(known)) or next(
        (k for k in known if k.lower() == name.lower()), None)
    return f" (did you mean {close!r}?)" if close else ""


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"steps": 8}}`` -> ``{"training.steps": 8}`` (lists and plain values
    stay as they are)."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# Hugging Face config.json keys -> this config's, for LLaMA-shaped models.
HF_KEYS = {"hidden_size": "model_config.hidden_size",
           "num_hidden_layers": "model_config.num_hidden_layers",
           "num_attention_heads": "model_config.num_attention_heads",
           "intermediate_size": "model_config.intermediate_size",
           "vocab_size": "data.vocab_size"}
HF_OPTIONAL = {"num_key_value_heads": "model_config.num_key_value_heads",
               "max_position_embeddings": "model_config.max_position_embeddings",
               "rms_norm_eps": "model_config.rms_norm_eps"}


def hf_model_path(name: str) -> Path | None:
    """The ``config.json`` that ``name`` points to (the file, or a directory holding one),
    or ``None`` when it names a train config."""
    path = Path(name)
    if path.is_dir() and (path / "config.json").exists():
        return path / "config.json"
    if path.suffix == ".json":
        if not path.exists():
            raise ConfigError(f"{path} not found")
        return path
    return None


def hf_model_overrides(path: Path) -> list[str]:
    """``--set`` items that give a run the shape of the Hugging Face model ``path``
    describes (a LLaMA-shaped decoder: hidden size, layers, heads, key/value heads, MLP
    width, vocabulary)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not a readable JSON config ({error})") from None
    missing = [k for k in HF_KEYS if k not in data]
    if missing:
        raise ConfigError(f"{path}: a LLaMA-shaped config needs {missing} (model_type "
                          f"{data.get('model_type')!r}); the planner models decoders with "
                          "LLaMA's attention and gated MLP")
    items = [f"{ours}={data[theirs]}" for theirs, ours in HF_KEYS.items()]
    items += [f"{ours}={data[theirs]}" for theirs, ours in HF_OPTIONAL.items()
              if data.get(theirs) is not None]
    return items


# What --resume may change: when and how often the run evaluates, saves and logs, and how
# long it goes on. Everything else would make the resumed run a different run.
RESUMABLE_KEYS = ("training.steps", "training.eval_every", "training.checkpoint_every",
                  "training.log_every")


def apply_resume_overrides(cfg: RunConfig, overrides: list[str]) -> list[tuple[str, Any, Any]]:
    """Apply ``--set`` overrides to a resumed run's configuration; only RESUMABLE_KEYS may
    change. Returns ``(key, old, new)`` for each change."""
    import yaml

    changes = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        if key not in RESUMABLE_KEYS:
            raise ConfigError(
                f"--set {key}: cannot change on --resume (the resumed run would no longer "
                f"continue the same trajectory); keys that may change: {list(RESUMABLE_KEYS)}"
            )
        section, name = key.split(".")
        old = getattr(getattr(cfg, section), name)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({error})") from None
        _merge(cfg, {section: {name: value}}, "", "--set")
        changes.append((key, old, getattr(getattr(cfg, section), name)))
    check_values(cfg, "--set")
    return changes
