"""eval.ppl: strided perplexity equal to transformers' loss on the same windows; corpora; bad input."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from eval.ppl import main
from gptoss_mla_jax import perplexity as perplexity_module
from gptoss_mla_jax.perplexity import perplexity, plan_windows, teacher_log_probs
from support.corpora import iter_texts
from weights.load import load_model


@pytest.fixture(scope="module")
def folder(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    model_dir = root / "model"
    shutil.copytree(tiny_hf[1], model_dir)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [t for t, _ in zip(iter_texts("stdlib", "train"), range(20), strict=False)]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=97, special_tokens=["[UNK]"]))
    tok.save(str(model_dir / "tokenizer.json"))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(t for t, _ in zip(iter_texts("stdlib", "test"), range(3), strict=False)))
    return tiny_hf[0], str(model_dir), str(corpus)


def test_windows_score_every_token_once():
    # With stride == max_length (disjoint windows) each window's first token has no context and is not
    # scored, as in transformers' guide; with overlap every token after the first is scored once.
    seen = [b + p for b, e, first in plan_windows(48, 16, 16) for p in range(first, e - b)]
    assert seen == [t for t in range(48) if t % 16]
    for n, L, s in ((100, 16, 8), (17, 16, 5), (5, 16, 8), (64, 16, 15)):
        seen = []
        for begin, end, first in plan_windows(n, L, s):
            assert end - begin <= L
            seen += [begin + p for p in range(first, end - begin)]
            # After the first window every scored token has at least L - s tokens of context.
            if begin > 0:
                assert first >= min(L - s, end - begin - 1)
        assert seen == list(range(1, n))


def test_fewer_windows_than_a_batch_are_not_padded(tiny_hf, monkeypatch):
    # Two windows with a batch of 8 run as one batch of two: a padding window costs a whole forward.
    config, params, _ = load_model(tiny_hf[1], progress=False)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 32)
    shapes = []
    score = perplexity_module._score
    monkeypatch.setattr(
        perplexity_module, "_score", lambda *a, **k: shapes.append(a[1].shape) or score(*a, **k)
    )
    assert perplexity(params, config, ids, 16, 16, batch=8, progress=False)["tokens"] == 30
    assert shapes == [(2, 16)]


def test_teacher_log_probs_computed_once_score_as_the_teacher_does(tiny_hf):
    # The quality study scores many students against one teacher: its log-probabilities, computed once,
    # give the same PPL, teacher PPL and KL as the teacher's forward run at every scoring; windows other
    # than theirs are refused.
    config, teacher, _ = load_model(tiny_hf[1], progress=False)
    student = {**teacher, "norm": teacher["norm"] * 1.1}
    ids = np.random.default_rng(1).integers(0, config.vocab_size, 40)
    reference = teacher_log_probs(teacher, config, ids, 16, 12, batch=2)
    once = perplexity(student, config, ids, 16, 12, batch=2, teacher=reference, progress=False)
    every = perplexity(student, config, ids, 16, 12, batch=2, teacher=(teacher, config), progress=False)
    assert once["kl"] > 1e-4
    for key in ("ppl", "teacher_ppl", "kl", "tokens"):
        assert once[key] == every[key], key
    with pytest.raises(
        ValueError, match=r"other windows: computed for \(max_length, stride, batch\) = \(16, 12, 2\)"
    ):
        perplexity(student, config, ids, 16, 16, batch=2, teacher=reference, progress=False)
    with pytest.raises(ValueError, match="other windows"):
        perplexity(student, config, ids[::-1].copy(), 16, 12, batch=2, teacher=reference, progress=False)


def test_matches_transformers_loss(folder, capsys):
    model, model_dir, corpus = folder
    L, stride, limit = 16, 6, 150
    assert (
        main(
            [
                "--model",
                model_dir,
                "--data",
                corpus,
                "--max-length",
                str(L),
                "--stride",
                str(stride),
                "--limit-tokens",
                str(limit),
                "--batch",
                "4",
                "--json",
            ]
        )
        == 0
    )
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # transformers' own loss, with the perplexity guide's labels (-100 on tokens an earlier window scored).
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    ids = torch.tensor(tok.encode(pathlib.Path(corpus).read_text()).ids[:limit])[None]
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + L, ids.size(1))
        inputs = ids[:, begin:end]
        labels = inputs.clone()
        labels[:, : -(end - prev_end)] = -100
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            nll_sum += float(model(inputs, labels=labels).loss) * n
        count += n
        prev_end = end
        if end == ids.size(1):
            break
    assert ours["tokens"] == count == limit - 1
    np.testing.assert_allclose(ours["ppl"], np.exp(nll_sum / count), rtol=1e-5)
    for key in ("ppl", "nll", "tokens", "tokens_per_s", "model", "data", "max_length", "stride"):
        assert key in ours


def test_compare_with_itself_has_zero_kl(folder, capsys):
    _, model_dir, corpus = folder
    flags = ["--data", corpus, "--max-length", "16", "--stride", "8", "--limit-tokens", "80", "--json"]
    assert main(["--model", model_dir, "--compare", model_dir, *flags]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(out["kl"]) < 1e-6 and out["teacher_ppl"] == pytest.approx(out["ppl"], rel=1e-6)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--stride", "32", "--max-length", "16"], "--stride 32 must be in 1..--max-length (16)"),
        (["--data", "/no/such/corpus"], "neither 'stdlib' nor an existing file or folder"),
        (["--data", "wikitext-2"], "wikitext-2 is not available offline"),
    ],
)
def test_bad_input(folder, capsys, flags, message):
    _, model_dir, _ = folder
    assert main(["--model", model_dir, *flags]) == 1
    assert message in capsys.readouterr().err


def test_model_without_tokenizer(tiny_hf, capsys):
    assert main(["--model", tiny_hf[1]]) == 1
    assert "has no tokenizer.json; pass --tokenizer" in capsys.readouterr().err


def test_empty_corpus(folder, tmp_path, capsys):
    _, model_dir, _ = folder
    (tmp_path / "empty.txt").write_text("  \n")
    assert main(["--model", model_dir, "--data", str(tmp_path / "empty.txt")]) == 1
    assert "is empty" in capsys.readouterr().err


def test_token_budget(folder, capsys):
    """The default scores the split's first 65,536 tokens, --all-tokens all of them, --limit-tokens N the
    first N (each window scores every token but the stream's first)."""
    _, model_dir, corpus = folder
    total = len(
        Tokenizer.from_file(f"{model_dir}/tokenizer.json").encode(pathlib.Path(corpus).read_text()).ids
    )
    flags = ["--model", model_dir, "--data", corpus, "--max-length", "64", "--stride", "32", "--json"]
    scored = {}
    for name, extra in {"default": [], "all": ["--all-tokens"], "40": ["--limit-tokens", "40"]}.items():
        assert main([*flags, *extra]) == 0
        scored[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"]
    assert scored == {"default": min(total, 65536) - 1, "all": total - 1, "40": 39}
