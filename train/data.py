"""Text corpora available offline, and token streams cut from them.

`stdlib`: the running interpreter's standard-library sources (real text on every machine, the GPU
machine included), split deterministically by file path into train / validation / test. Any other
source is a local text file or a folder of .txt / .md / .rst / .py files.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator

import numpy as np

SPLITS = ("train", "validation", "test")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


def split_of(relative_path: str) -> str:
    """Deterministic split by a hash of the path: 5% test, 5% validation, 90% train."""
    bucket = int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def corpus_files(source: str, split: str | None = None) -> list[str]:
    """Sorted files of a corpus (`stdlib` or a local file / folder), optionally of one split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if source == "stdlib":
        root, suffixes = sysconfig.get_paths()["stdlib"], (".py",)
    elif os.path.isfile(source):
        return [source]
    elif os.path.isdir(source):
        root, suffixes = source, TEXT_SUFFIXES
    else:
        raise FileNotFoundError(f"data source {source!r} is neither 'stdlib' nor an existing file or folder")
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(suffixes)]
    if split is not None:
        files = [f for f in files if split_of(os.path.relpath(f, root)) == split]
    return files


def iter_texts(source: str, split: str | None = None) -> Iterator[str]:
    for file in corpus_files(source, split):
        with open(file, encoding="utf-8", errors="replace") as f:
            yield f.read()


def token_windows(tokenizer, source: str, n_tokens: int, seq_len: int, split: str = "train") -> np.ndarray:
    """[n, seq_len] int32 windows of consecutive tokens, n = ceil(n_tokens / seq_len), from the start of
    the corpus split (documents concatenated)."""
    n = -(-n_tokens // seq_len)
    stream: list[int] = []
    for text in iter_texts(source, split):
        stream += tokenizer.encode(text).ids
        if len(stream) >= n * seq_len:
            break
    if len(stream) < seq_len:
        raise ValueError(
            f"data source {source!r} ({split}) holds {len(stream)} tokens, fewer than one window of {seq_len}"
        )
    n = min(n, len(stream) // seq_len)
    return np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)
