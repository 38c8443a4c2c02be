"""Text corpora available offline, and token streams cut from them.

- `stdlib`: the running interpreter's standard-library sources (real text on every machine, the GPU
  machine included), split deterministically by file path into train / validation / test.
- `python-doc`: the English reST sources of Debian's python3.11-doc package
  (`apt-get install python3.11-doc`, or their folder in $GPTOSS_PYTHON_DOC), split the same way.
- `wikitext-2` (`wikitext-2-raw-v1`): through `datasets`, from its local cache only (no network here).
- a local text file or folder (.txt / .md / .rst / .py), or a .jsonl / .json / .parquet file or a folder of
  them, read with `datasets` (column `text`); a file is its own split.
- `A+B` (e.g. `stdlib+python-doc`): the documents of both, interleaved one by one, so any prefix of a split
  (the training stream, a calibration pool) holds both kinds of text.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sysconfig
from collections.abc import Iterator

import numpy as np

SPLITS = ("train", "validation", "test")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".raw")
DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PYTHON_DOC = os.environ.get("GPTOSS_PYTHON_DOC", "/usr/share/doc/python3.11/html/_sources")
WIKITEXT = ("wikitext-2", "wikitext-2-raw-v1")


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
    elif source == "python-doc":
        if not os.path.isdir(PYTHON_DOC):
            raise FileNotFoundError(
                f"data source python-doc needs {PYTHON_DOC}: apt-get install python3.11-doc, or set "
                "GPTOSS_PYTHON_DOC to a folder holding its html/_sources"
            )
        root, suffixes = PYTHON_DOC, (".txt",)
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


def _wikitext(split: str) -> Iterator[str]:
    import datasets

    try:
        with _offline():
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:
        raise FileNotFoundError(
            "wikitext-2 is not available offline. On a machine with network run `python -c "
            "\"import datasets; datasets.load_dataset('wikitext', 'wikitext-2-raw-v1')\"` and copy "
            "~/.cache/huggingface/datasets here, or pass --data "
            f"/path/to/wikitext-2-raw/wiki.{split}.raw ({e})"
        ) from None
    yield "".join(rows["text"])


class _offline:
    """datasets / huggingface_hub in offline mode while reading (their flags are read at import time, so
    the module constants are set), so nothing waits on a network that is not there."""

    def __enter__(self):
        import datasets.config
        import huggingface_hub.constants

        self.saved = (datasets.config.HF_DATASETS_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
        datasets.config.HF_DATASETS_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True

    def __exit__(self, *exc):
        import datasets.config
        import huggingface_hub.constants

        datasets.config.HF_DATASETS_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = self.saved


def _dataset_files(source: str) -> list[str]:
    if os.path.isfile(source):
        return [source] if source.endswith(tuple(DATASET_SUFFIXES)) else []
    if os.path.isdir(source):
        found = sorted(
            os.path.join(source, n) for n in os.listdir(source) if n.endswith(tuple(DATASET_SUFFIXES))
        )
        return found if found and len({os.path.splitext(f)[1] for f in found}) == 1 else []
    return []


def iter_texts(source: str, split: str | None = None) -> Iterator[str]:
    """The documents of a corpus split, one string each."""
    if "+" in source and not os.path.exists(source):
        parts = [iter_texts(part, split) for part in source.split("+")]
        for texts in itertools.zip_longest(*parts):
            yield from (t for t in texts if t is not None)
        return
    if source in WIKITEXT:
        yield from _wikitext(split or "test")
        return
    files = _dataset_files(source)
    if files:
        import datasets

        with _offline():
            rows = datasets.load_dataset(
                DATASET_SUFFIXES[os.path.splitext(files[0])[1]], data_files=files, split="train"
            )
        if "text" not in rows.column_names:
            raise ValueError(f"data source {source}: no 'text' column (has {rows.column_names})")
        yield from (t for t in rows["text"] if t)
        return
    for file in corpus_files(source, split if source in ("stdlib", "python-doc") else None):
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


def pack(token_ids: np.ndarray, seq_len: int) -> np.ndarray:
    """A token stream cut into [n, seq_len] rows (the tail that does not fill a row is dropped)."""
    n = len(token_ids) // seq_len
    if n == 0:
        raise ValueError(f"{len(token_ids)} tokens do not fill one sequence of {seq_len}")
    return np.asarray(token_ids[: n * seq_len], np.int32).reshape(n, seq_len)


def corpus_ids(tokenizer, data: str, split: str, limit_tokens: int | None) -> np.ndarray:
    """The corpus split's documents joined and tokenized as one stream (its first `limit_tokens`)."""
    text = "\n\n".join(iter_texts(data, split))
    if not text.strip():
        raise ValueError(f"--data {data} ({split}) is empty")
    ids = np.asarray(tokenizer.encode(text).ids, np.int32)
    return ids[:limit_tokens] if limit_tokens else ids
