"""train.data: mixed corpora; the grain training iterator (packing, seeded shuffling, host sharding, exact
resume)."""

import numpy as np
import pytest

from support.corpora import iter_texts, pack
from train.data import training_batches


def test_pack():
    rows = pack(np.arange(23), 5)
    assert rows.shape == (4, 5) and rows.dtype == np.int32 and rows[1, 0] == 5
    with pytest.raises(ValueError, match="do not fill one sequence"):
        pack(np.arange(3), 5)


def test_shuffle_shard_and_resume():
    sequences = pack(np.arange(64 * 4), 4)  # 64 sequences, row i starts with 4 * i
    take = lambda it, n: [next(it) for _ in range(n)]
    a = take(training_batches(sequences, 8, seed=1), 16)  # two epochs
    b = take(training_batches(sequences, 8, seed=1), 16)
    c = take(training_batches(sequences, 8, seed=2), 16)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not all((x == y).all() for x, y in zip(a, c, strict=True))
    first_epoch = np.concatenate(a[:8])[:, 0] // 4
    assert sorted(first_epoch.tolist()) == list(range(64))  # every sequence once per epoch
    assert not (np.concatenate(a[8:])[:, 0] // 4 == first_epoch).all()  # reshuffled

    # Two hosts read the two halves of the batches one host reads.
    h0 = take(training_batches(sequences, 8, 1, 0, 2), 16)
    h1 = take(training_batches(sequences, 8, 1, 1, 2), 16)
    assert all(x.shape == (4, 4) for x in h0 + h1)
    assert all((np.concatenate([x, y]) == z).all() for x, y, z in zip(h0, h1, a, strict=True))
    with pytest.raises(ValueError, match="dividing 8"):
        training_batches(sequences, 8, 1, 0, 3)

    # A resumed iterator sees exactly the batches it would have seen.
    it = training_batches(sequences, 8, seed=1)
    take(it, 5)
    state = it.get_state()
    rest = take(it, 6)
    resumed = training_batches(sequences, 8, seed=1)
    resumed.set_state(state)
    assert all((x == y).all() for x, y in zip(take(resumed, 6), rest, strict=True))
    assert all((x == y).all() for x, y in zip(rest, a[5:11], strict=True))


def test_mixed_corpus_interleaves_documents(tmp_path):
    for folder, names in (("code", ["a.py", "b.py", "c.py"]), ("prose", ["x.txt"])):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_text(name)
    mixed = list(iter_texts(f"{tmp_path / 'code'}+{tmp_path / 'prose'}"))
    assert mixed == ["a.py", "x.txt", "b.py", "c.py"]
