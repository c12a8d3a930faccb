"""Corpora (embedded pydoc, local files) and packing, with the real MiniLM tokenizer."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hub_sae.data import DataConfig, chunks, iter_texts, pack, token_batches
from hub_sae.models.hf import default_model_path
from tests.conftest import PEAK_RSS, ROOT

BOS, EOS = 101, 102


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def test_pydoc_split_is_fixed_disjoint_and_about_a_tenth() -> None:
    train = set(iter_texts(DataConfig(split="train")))
    heldout = set(iter_texts(DataConfig(split="heldout", seed=5)))
    assert train and heldout and not train & heldout
    share = sum(map(len, heldout)) / (sum(map(len, heldout)) + sum(map(len, train)))
    assert 0.05 < share < 0.15
    assert heldout == set(iter_texts(DataConfig(split="heldout", seed=6)))  # seed: order only


def test_order_depends_on_seed_only() -> None:
    assert list(iter_texts(DataConfig(seed=1))) == list(iter_texts(DataConfig(seed=1)))
    assert list(iter_texts(DataConfig(seed=1))) != list(iter_texts(DataConfig(seed=2)))


def test_pack_joins_documents_with_eos_after_one_bos(tokenizer) -> None:
    texts = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota kappa"]
    contexts = list(pack(texts, tokenizer, ctx_len=5, bos_token_id=BOS, eos_token_id=EOS))
    stream = [
        t for text in texts for t in [EOS, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    ][1:]
    assert all(c.shape == (5,) and c[0] == BOS for c in contexts)
    body = [t for c in contexts for t in c[1:].tolist()]
    assert (
        body == stream[: len(body)] and len(stream) - len(body) < 4
    )  # only the partial tail dropped


def test_token_batches_shape_and_resume(tokenizer) -> None:
    data = DataConfig(ctx_len=32, batch_size=4, max_docs=20)
    batches = list(token_batches(data, tokenizer, BOS, EOS))
    assert len(batches) > 3
    for ids, mask in batches:
        assert ids.shape == mask.shape == (4, 32) and mask.all() and (ids[:, 0] == BOS).all()
    skipped = list(token_batches(data, tokenizer, BOS, EOS, skip_batches=2))
    assert len(skipped) == len(batches) - 2
    assert all((a[0] == b[0]).all() for a, b in zip(skipped, batches[2:], strict=False))


def test_local_txt_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    rows = [{"text": f"row {i}"} for i in range(20)]
    (tmp_path / "b.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    train = list(iter_texts(DataConfig(corpus=str(tmp_path))))
    heldout = list(iter_texts(DataConfig(corpus=str(tmp_path), split="heldout")))
    assert sorted(train + heldout) == sorted(
        ["first doc", "second doc", *(r["text"] for r in rows)]
    )
    assert len(heldout) == 2  # every 10th of the 22 documents


@pytest.mark.parametrize(
    ("files", "corpus", "kwargs", "message"),
    [
        ({}, "missing.txt", {}, "corpus 'missing.txt' does not exist"),
        ({}, "runs/typo.jsonl", {}, "corpus 'runs/typo.jsonl' does not exist"),
        ({}, "nocorpus", {}, "corpus 'nocorpus' does not exist; .* HF dataset id \\(owner/name"),
        ({"x.jsonl": '{"body": "a"}\n'}, "x.jsonl", {}, "x.jsonl:1 has no field 'text'"),
        ({"x.jsonl": "{not json\n"}, "x.jsonl", {}, "x.jsonl:1 is not valid JSON"),
        (
            {"x.jsonl": '{"text": "a"}\n{"text": null}\n'},
            "x.jsonl",
            {},
            "x.jsonl:2: field 'text' is null, not a string; fill it",
        ),
        (
            {"x.txt": "only one doc"},
            "x.txt",
            {"split": "heldout"},
            "no document in split 'heldout'",
        ),
        (
            {"x.txt": "a"},
            "x.txt",
            {"split": "validation"},
            "split 'validation' is not one of train, heldout",
        ),
    ],
)
def test_bad_corpus_is_named(tmp_path: Path, monkeypatch, files, corpus, kwargs, message) -> None:
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        list(iter_texts(DataConfig(corpus=corpus, **kwargs)))


def test_binary_txt_is_named_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("a document")
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"blob.txt is not UTF-8 text \(byte 128: .*convert it"):
        list(iter_texts(DataConfig(corpus=str(tmp_path))))


def words(n: int, seed: int = 0) -> str:
    """`n` random lower-case words joined by single spaces and a few newlines: one paragraph."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghij", k=rng.randint(2, 9))) for _ in range(3000)]
    return "".join(rng.choice(vocab) + rng.choice(" " * 30 + "\n") for _ in range(n)).strip()


def test_long_document_is_tokenized_in_chunks_as_in_one_call(tokenizer) -> None:
    text = words(12_000)
    pieces = list(chunks(text, size=1000))
    assert "".join(pieces) == text and all(len(p) <= 1000 for p in pieces)
    assert all(p[0] in " \n" for p in pieces[1:])  # cut before whitespace, never inside a word
    assert list(chunks("x" * 2500, size=1000)) == ["x" * 1000, "x" * 1000, "x" * 500]
    contexts = list(pack([text], tokenizer, ctx_len=64, bos_token_id=BOS, eos_token_id=EOS))
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = [t for c in contexts for t in c[1:].tolist()]
    assert len(contexts) == len(whole) // 63 and body == whole[: len(body)]


MEASURE = (
    """
import sys
from transformers import AutoTokenizer
from hub_sae.data import DataConfig, token_batches
from hub_sae.models.hf import default_model_path
tokenizer = AutoTokenizer.from_pretrained(default_model_path())
tokenizer("warm up")
"""
    + PEAK_RSS
    + """
data = DataConfig(corpus=sys.argv[1], ctx_len=64)
batches = sum(1 for _ in token_batches(data, tokenizer, 101, 102))
print(batches, (kb("VmHWM") - before) // 1024)
"""
)


def test_one_line_corpus_keeps_tokenizer_memory_bounded(tmp_path: Path) -> None:
    """A 0.6 MB paragraph raised the peak RSS by ~100 MB when tokenized in one call, ~3 MB now."""
    corpus = tmp_path / "one_line.txt"
    corpus.write_text(words(100_000).replace("\n", " "))
    assert corpus.stat().st_size > 5.5e5
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", MEASURE, str(corpus)]
    batches, grown_mb = map(int, subprocess.check_output(cmd, env=env, text=True).split())
    assert batches > 200 and grown_mb < 30, (batches, grown_mb)
