"""Perplexity with strided sliding windows, as in transformers' perplexity guide.

Window i starts at i * stride and is max_length long; it scores only the tokens the previous window did
not reach, so every token is scored exactly once and, after the first window, with at least
max_length - stride tokens of context. With a teacher, its perplexity on the same windows and the mean
per-token KL(teacher || model) come too. The command line is `eval.ppl`.
"""

from __future__ import annotations

import functools
import hashlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array
from tqdm.auto import tqdm

from gptoss_mla_jax.model import forward


def plan_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window, as in transformers' perplexity guide."""
    if stride > max_length:
        raise ValueError(f"--stride {stride} is larger than --max-length {max_length}")
    if n_tokens < 2:
        raise ValueError(f"the corpus holds {n_tokens} tokens; at least 2 are needed to score one")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        # Target positions (in the window) scored by this window; position 0 has no prediction.
        windows.append((begin, end, max(end - prev_end, 0)))
        prev_end = end
        if end == n_tokens:
            break
    return [(b, e, max(e - b - t, 1)) for b, e, t in windows]


@functools.partial(jax.jit, static_argnames=("config",))
def _log_probs(params, tokens, config):
    return jax.nn.log_softmax(forward(params, tokens, None, config)[0][:, :-1], axis=-1)


@functools.partial(jax.jit, static_argnames=("config",))
def _score(params, tokens, lengths, first, config, teacher_log_probs=None):
    """Per batch: summed NLL of the scored tokens, their count, and (with the teacher's log-probabilities)
    its NLL and the KL."""
    logp = _log_probs(params, tokens, config)
    target = tokens[:, 1:]
    pos = jnp.arange(1, tokens.shape[1])[None, :]
    mask = (pos >= first[:, None]) & (pos < lengths[:, None])
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    out = {"nll": jnp.where(mask, nll, 0).sum(), "count": mask.sum()}
    if teacher_log_probs is not None:
        logq = teacher_log_probs
        t_nll = -jnp.take_along_axis(logq, target[..., None], axis=-1)[..., 0]
        kl = (jnp.exp(logq) * (logq - logp)).sum(-1)
        out["teacher_nll"] = jnp.where(mask, t_nll, 0).sum()
        out["kl"] = jnp.where(mask, kl, 0).sum()
    return out


def batches(
    ids: np.ndarray, max_length: int, stride: int, batch: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """perplexity()'s windows of a token stream in batches: (tokens zero-padded, lengths, first scored
    position) per batch."""
    windows = plan_windows(len(ids), max_length, stride)
    # Fewer windows than a batch fill a smaller one: padding windows cost a whole forward each (two long
    # windows in a batch of 8 are four times the work).
    batch = min(batch, len(windows))
    out = []
    for i in range(0, len(windows), batch):
        tokens = np.zeros((batch, max_length), np.int32)
        lengths, first = np.zeros(batch, np.int32), np.full(batch, max_length, np.int32)
        for j, (begin, end, start) in enumerate(windows[i : i + batch]):
            tokens[j, : end - begin] = ids[begin:end]
            lengths[j], first[j] = end - begin, start
        out.append((tokens, lengths, first))
    return out


class TeacherLogProbs(NamedTuple):
    """A teacher's log-probabilities on every batch of perplexity()'s windows of one token stream, computed
    once (`teacher_log_probs`) for scoring several students on the same windows: each then costs its own
    forward only. They take batch x window x vocabulary float32 values per batch, so they suit small
    vocabularies; `perplexity(teacher=(params, config))` computes them batch by batch instead."""

    key: tuple  # (stream digest, max_length, stride, batch): the windows they belong to
    log_probs: list[Array]


def _windows_key(ids: np.ndarray, max_length: int, stride: int, batch: int) -> tuple:
    return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest(), max_length, stride, batch


def teacher_log_probs(
    teacher, teacher_config, ids: np.ndarray, max_length: int, stride: int, batch: int = 8
) -> TeacherLogProbs:
    planned = batches(ids, max_length, stride, batch)
    log_probs = [_log_probs(teacher, jnp.asarray(tokens), teacher_config) for tokens, _, _ in planned]
    return TeacherLogProbs(_windows_key(ids, max_length, stride, batch), log_probs)


def perplexity(
    params,
    config,
    ids: np.ndarray,
    max_length: int,
    stride: int,
    batch: int = 8,
    teacher: tuple | TeacherLogProbs | None = None,
    progress: bool = True,
) -> dict:
    """PPL (and, with `teacher=(params, config)` or its `TeacherLogProbs` on these windows, the teacher's
    PPL and mean KL) over the token stream."""
    if isinstance(teacher, TeacherLogProbs) and teacher.key != _windows_key(ids, max_length, stride, batch):
        raise ValueError(
            "teacher log-probabilities of other windows: computed for (max_length, stride, batch) = "
            f"{teacher.key[1:]} and another token stream, asked for {(max_length, stride, batch)}"
        )
    planned = batches(ids, max_length, stride, batch)
    totals: dict[str, float] = {}
    t0 = time.perf_counter()
    for i, (tokens, lengths, first) in enumerate(
        tqdm(planned, desc="scoring", unit="batch", disable=not progress)
    ):
        tokens = jnp.asarray(tokens)
        logq = None
        if isinstance(teacher, TeacherLogProbs):
            logq = teacher.log_probs[i]
        elif teacher:
            logq = _log_probs(teacher[0], tokens, teacher[1])
        out = _score(params, tokens, jnp.asarray(lengths), jnp.asarray(first), config, logq)
        for key, value in out.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    seconds = time.perf_counter() - t0
    n = totals["count"]
    result = {"ppl": float(np.exp(totals["nll"] / n)), "nll": totals["nll"] / n, "tokens": int(n)}
    result["tokens_per_s"] = n / seconds
    if teacher:
        result["teacher_ppl"] = float(np.exp(totals["teacher_nll"] / n))
        result["kl"] = totals["kl"] / n
    return result
