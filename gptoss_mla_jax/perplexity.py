"""Perplexity with strided sliding windows, as in transformers' perplexity guide.

Window i starts at i * stride and is max_length long; it scores only the tokens the previous window did
not reach, so every token is scored exactly once and, after the first window, with at least
max_length - stride tokens of context. With a teacher, its perplexity on the same windows and the mean
per-token KL(teacher || model) come too. The command line is `eval.ppl`.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
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


@functools.partial(jax.jit, static_argnames=("config", "teacher_config"))
def _score(params, tokens, lengths, first, config, teacher=None, teacher_config=None):
    """Per batch: summed NLL of the scored tokens, their count, and (with a teacher) its NLL and the KL."""
    logp = jax.nn.log_softmax(forward(params, tokens, None, config)[0][:, :-1], axis=-1)
    target = tokens[:, 1:]
    pos = jnp.arange(1, tokens.shape[1])[None, :]
    mask = (pos >= first[:, None]) & (pos < lengths[:, None])
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    out = {"nll": jnp.where(mask, nll, 0).sum(), "count": mask.sum()}
    if teacher is not None:
        logq = jax.nn.log_softmax(forward(teacher, tokens, None, teacher_config)[0][:, :-1], axis=-1)
        t_nll = -jnp.take_along_axis(logq, target[..., None], axis=-1)[..., 0]
        kl = (jnp.exp(logq) * (logq - logp)).sum(-1)
        out["teacher_nll"] = jnp.where(mask, t_nll, 0).sum()
        out["kl"] = jnp.where(mask, kl, 0).sum()
    return out


def perplexity(
    params,
    config,
    ids: np.ndarray,
    max_length: int,
    stride: int,
    batch: int = 8,
    teacher=None,
    progress: bool = True,
) -> dict:
    """PPL (and, with `teacher=(params, config)`, the teacher's PPL and mean KL) over the token stream."""
    windows = plan_windows(len(ids), max_length, stride)
    # Fewer windows than a batch fill a smaller one: padding windows cost a whole forward each (two long
    # windows in a batch of 8 are four times the work).
    batch = min(batch, len(windows))
    totals: dict[str, float] = {}
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(windows), batch), desc="scoring", unit="batch", disable=not progress):
        chunk = windows[i : i + batch]
        tokens = np.zeros((batch, max_length), np.int32)
        lengths, first = np.zeros(batch, np.int32), np.full(batch, max_length, np.int32)
        for j, (begin, end, start) in enumerate(chunk):
            tokens[j, : end - begin] = ids[begin:end]
            lengths[j], first[j] = end - begin, start
        t_params, t_config = teacher if teacher else (None, None)
        out = _score(
            params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(first), config, t_params, t_config
        )
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
