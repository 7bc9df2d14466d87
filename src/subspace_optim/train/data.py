"""Text sources, the tokenizer, and packed token sequences.

Sources: ``stdlib`` (the embedded default: the running Python's standard-library sources,
split into train and validation by a hash of each file's relative path, so the split never
changes with the machine), local ``files`` (.txt, .jsonl, .parquet, globs) and a ``hub``
dataset streamed with ``datasets``. The tokenizer is a byte-level BPE trained on the train
split at first use and cached, or a local tokenizer directory. Tokens are packed into
sequences of ``seq_len + 1`` (inputs and their next-token targets).
"""

from __future__ import annotations

import glob
import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ConfigError, DataConfig
from .deps import require


def _cache_dir(cfg: DataConfig) -> Path:
    path = Path(cfg.cache_dir) if cfg.cache_dir else Path.home() / ".cache" / "subspace_optim"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _take(texts: Iterator[str], max_bytes: int) -> list[str]:
    out, total = [], 0
    for text in texts:
        if total >= max_bytes:
            break
        text = text[: max_bytes - total]
        out.append(text)
        total += len(text.encode("utf-8", "replace"))
    return out


def _stdlib_texts(split: str) -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")):
            continue
        is_val = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 20 == 0  # 5% of files
        if (split == "val") != is_val:
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def _file_texts(cfg: DataConfig, split: str) -> Iterator[str]:
    datasets = require("datasets")
    files = sorted(f for pattern in cfg.paths for f in glob.glob(pattern, recursive=True))
    if not files:
        raise ConfigError(f"data.paths {cfg.paths!r} match no file")
    suffix = Path(files[0]).suffix
    builder = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
    if builder is None:
        raise ConfigError(f"data.paths: unsupported file type {suffix!r} (.txt .jsonl .parquet)")
    # A deterministic 95/5 split of the records (files may be a single document).
    ds = datasets.load_dataset(builder, data_files=files, split="train")
    field = "text" if builder == "text" else cfg.text_field
    for i, record in enumerate(ds):
        if (split == "val") == (i % 20 == 0):
            yield record[field]


def _hub_texts(cfg: DataConfig, split: str) -> Iterator[str]:
    datasets = require("datasets")
    hub_split = "train" if split == "train" else "validation"
    try:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=hub_split, streaming=True)
        for record in ds:
            yield record[cfg.text_field]
    except (ConnectionError, OSError, FileNotFoundError, ValueError) as error:
        raise ConfigError(
            f"dataset {cfg.hub_name!r} ({cfg.hub_config}) cannot be reached: {error}. It is "
            "streamed from the Hugging Face hub, which needs the network; offline, use "
            "data.source=stdlib or data.source=files"
        ) from None


def texts(cfg: DataConfig, split: str) -> list[str]:
    limit = cfg.max_train_bytes if split == "train" else cfg.max_val_bytes
    source = {"stdlib": lambda: _stdlib_texts(split), "files": lambda: _file_texts(cfg, split),
              "hub": lambda: _hub_texts(cfg, split)}[cfg.source]
    out = _take(source(), limit)
    if not out:
        raise ConfigError(f"data source {cfg.source!r} gave no {split} text")
    return out


def _fingerprint(cfg: DataConfig) -> str:
    key = json.dumps([cfg.source, cfg.paths, cfg.hub_name, cfg.hub_config, cfg.vocab_size,
                      cfg.max_train_bytes, sys.version_info[:2]])
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def load_tokenizer(cfg: DataConfig, train_texts: list[str] | None = None):
    """A ``tokenizers.Tokenizer``: from ``cfg.tokenizer``, from the cache, or trained."""
    tokenizers = require("tokenizers")
    if cfg.tokenizer:
        path = Path(cfg.tokenizer)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"data.tokenizer: no tokenizer.json at {path}")
        return tokenizers.Tokenizer.from_file(str(file))
    cached = _cache_dir(cfg) / f"bpe-{_fingerprint(cfg)}.json"
    if cached.exists():
        return tokenizers.Tokenizer.from_file(str(cached))
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(train_texts if train_texts is not None else texts(cfg, "train"),
                            trainer=trainer)
    tmp = cached.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(cached)  # atomic: a crash never leaves half a tokenizer in the cache
    return tok


def encode(tok, docs: list[str]) -> torch.Tensor:
    eos = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def pack(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping sequences of ``seq_len + 1`` tokens (the last partial one dropped)."""
    n = (tokens.numel() - 1) // seq_len
    if n < 1:
        raise ConfigError(f"not enough tokens ({tokens.numel()}) for one sequence of {seq_len}")
    starts = torch.arange(n) * seq_len
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])


class Batches:
    """Deterministic batches: micro-batch ``i`` of the run is a function of ``i`` and the
    seed alone (a fresh permutation of the sequences each epoch), so resuming needs only
    the count of micro-batches consumed."""

    def __init__(self, sequences: torch.Tensor, batch_size: int, seed: int) -> None:
        if sequences.shape[0] < batch_size:
            raise ConfigError(
                f"training.batch_size={batch_size} exceeds the {sequences.shape[0]} training "
                "sequences; use more data or a smaller batch"
            )
        self.sequences, self.batch_size, self.seed = sequences, batch_size, seed
        self.per_epoch = sequences.shape[0] // batch_size
        self._epoch, self._perm = -1, None

    def __getitem__(self, index: int) -> torch.Tensor:
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.sequences.shape[0], generator=gen)
            self._epoch = epoch
        rows = self._perm[position * self.batch_size : (position + 1) * self.batch_size]
        return self.sequences[rows]


def prepare(cfg: DataConfig, seed: int, batch_size: int):
    """(tokenizer, train Batches, validation sequences), with token tensors cached."""
    cache = _cache_dir(cfg) / f"tokens-{_fingerprint(cfg)}-{cfg.max_val_bytes}.pt"
    if cfg.tokenizer is None and cache.exists():
        tok = load_tokenizer(cfg)
        saved = torch.load(cache, weights_only=True)
        train_ids, val_ids = saved["train"], saved["val"]
    else:
        train_docs = texts(cfg, "train")
        tok = load_tokenizer(cfg, train_docs)
        train_ids, val_ids = encode(tok, train_docs), encode(tok, texts(cfg, "val"))
        if cfg.tokenizer is None:
            tmp = cache.with_suffix(".tmp")
            torch.save({"train": train_ids, "val": val_ids}, tmp)
            tmp.replace(cache)
    return (tok, Batches(pack(train_ids, cfg.seq_len), batch_size, seed),
            pack(val_ids, cfg.seq_len))
