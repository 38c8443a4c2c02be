"""Training batches: an endless, checkpointable grain iterator over packed token sequences (the corpora
themselves are `support.corpora`)."""

from __future__ import annotations

import numpy as np


def training_batches(
    sequences: np.ndarray, batch: int, seed: int, shard_index: int = 0, shard_count: int = 1
):
    """An endless, checkpointable grain iterator over global batches of `batch` sequences.

    Sequences are shuffled with `seed` (reshuffled every epoch). Each global batch is cut into
    `shard_count` equal blocks of rows and this host reads only block `shard_index` ([batch /
    shard_count, seq_len] int32), so hosts together see exactly what one host would. `get_state()` /
    `set_state()` resume exactly where a run stopped.
    """
    import grain

    if not 0 <= shard_index < shard_count or batch % shard_count:
        raise ValueError(f"shard {shard_index} of {shard_count}: needs 0 <= index < count dividing {batch}")
    if len(sequences) < batch:
        raise ValueError(f"{len(sequences)} sequences, fewer than one batch of {batch}")
    dataset = grain.MapDataset.source(sequences)
    # Shuffle before repeat: every epoch is a permutation, and each epoch gets a new one.
    dataset = dataset.shuffle(seed=seed).repeat(None).batch(batch // shard_count, drop_remainder=True)
    return iter(dataset[shard_index::shard_count].to_iter_dataset())
