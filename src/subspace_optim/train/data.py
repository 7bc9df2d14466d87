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

from .checkpoint import write_atomic
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


def _data_files(cfg: DataConfig) -> list[Path]:
    files = sorted({Path(f) for pattern in cfg.paths for f in glob.glob(pattern, recursive=True)})
    files = [f for f in files if f.is_file()]
    if not files:
        raise ConfigError(f"data.paths {cfg.paths!r} match no file")
    for f in files:
        if f.suffix not in READERS:
            raise ConfigError(f"data file {f}: unsupported type {f.suffix!r} (.txt .jsonl "
                              ".json .parquet)")
    return files


def _text_lines(path: Path, field: str) -> Iterator[str]:
    """Lines of a UTF-8 text file; a NUL byte or an invalid UTF-8 sequence is an error that
    names the file and line (a binary file given as text)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if b"\x00" in raw:
                raise ConfigError(f"data file {path}, line {number}: a NUL byte; this looks like "
                                  "a binary file, not text")
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise ConfigError(f"data file {path}, line {number}: not UTF-8 text "
                                  f"({error.reason} at byte {error.start})") from None


def _json_lines(path: Path, field: str) -> Iterator[str]:
    """The ``field`` of each JSON record, one per line; blank lines are skipped."""
    for number, line in enumerate(_text_lines(path, field), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"data file {path}, line {number}: not valid JSON "
                              f"({error.msg})") from None
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ConfigError(f"data file {path}, line {number}: no {field!r} field "
                              f"(data.text_field; the record has {keys})")
        if not isinstance(record[field], str):
            raise ConfigError(f"data file {path}, line {number}: {field!r} is a "
                              f"{type(record[field]).__name__}, not text")
        yield record[field]


def _parquet_column(path: Path, field: str) -> Iterator[str]:
    require("pyarrow")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[field])
    except Exception as error:  # pyarrow raises several types for bad files and columns
        raise ConfigError(f"data file {path}: cannot read column {field!r} "
                          f"(data.text_field): {error}") from None
    for value in table.column(field).to_pylist():
        if value is not None:
            yield str(value)


READERS = {".txt": _text_lines, ".jsonl": _json_lines, ".json": _json_lines,
           ".parquet": _parquet_column}


def _file_texts(cfg: DataConfig, split: str) -> Iterator[str]:
    # A deterministic 95/5 split of the records (lines or rows) across all files.
    index = 0
    for path in _data_files(cfg):
        for text in READERS[path.suffix](path, cfg.text_field):
            if (split == "val") == (index % 20 == 0):
                yield text
            index += 1


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
    if not any(text.strip() for text in out):
        where = f"data files {[str(f) for f in _data_files(cfg)]}" if cfg.source == "files" \
            else f"data source {cfg.source!r}"
        raise ConfigError(f"{where} gave no {split} text (empty?)")
    return out


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_key(cfg: DataConfig) -> list:
    """What the text depends on: for files their size, modification time and content hash
    (a changed file must not be served from the cache), for the standard library its
    version and files."""
    if cfg.source == "files":
        files = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns, _file_digest(f)]
                 for f in _data_files(cfg)]
        return ["files", files, cfg.text_field]
    if cfg.source == "hub":
        return ["hub", cfg.hub_name, cfg.hub_config, cfg.text_field]
    root = Path(sysconfig.get_paths()["stdlib"])
    stats = [(p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*.py")]
    return ["stdlib", sys.version, str(root), len(stats), sum(s for s, _ in stats),
            max((m for _, m in stats), default=0)]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def _tokenizer_file(cfg: DataConfig) -> Path | None:
    if not cfg.tokenizer:
        return None
    path = Path(cfg.tokenizer)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"data.tokenizer: no tokenizer.json at {path}")
    return file


def load_tokenizer(cfg: DataConfig, train_texts: list[str] | None = None,
                   source_key: list | None = None):
    """A ``tokenizers.Tokenizer``: from ``cfg.tokenizer``, from the cache, or trained."""
    tokenizers = require("tokenizers")
    file = _tokenizer_file(cfg)
    if file is not None:
        try:
            return tokenizers.Tokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises its own exception type
            raise ConfigError(f"data.tokenizer: cannot read {file}: {error}") from None
    key = _key(source_key or _source_key(cfg), cfg.vocab_size, cfg.max_train_bytes)
    cached = _cache_dir(cfg) / f"bpe-{key}.json"
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
    # A unique temporary name, then an atomic rename: two runs starting at once on an empty
    # cache never write into each other's file, and a crash never leaves half a tokenizer.
    write_atomic(cached, lambda f: f.write(tok.to_str().encode()))
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
    """(tokenizer, train Batches, validation sequences), with token tensors cached under a
    key of everything they depend on: the text (by content), the tokenizer and the limits."""
    source_key = _source_key(cfg)
    file = _tokenizer_file(cfg)
    tokenizer_key = ["file", _file_digest(file)] if file else ["bpe", cfg.vocab_size]
    key = _key(source_key, tokenizer_key, cfg.max_train_bytes, cfg.max_val_bytes)
    cache = _cache_dir(cfg) / f"tokens-{key}.pt"
    if cache.exists():
        tok = load_tokenizer(cfg, source_key=source_key)
        saved = torch.load(cache, weights_only=True)
        train_ids, val_ids = saved["train"], saved["val"]
    else:
        train_docs = texts(cfg, "train")
        tok = load_tokenizer(cfg, train_docs, source_key=source_key)
        train_ids, val_ids = encode(tok, train_docs), encode(tok, texts(cfg, "val"))
        write_atomic(cache, lambda f: torch.save({"train": train_ids, "val": val_ids}, f))
    return (tok, Batches(pack(train_ids, cfg.seq_len), batch_size, seed),
            pack(val_ids, cfg.seq_len))
