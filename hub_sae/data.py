"""Text corpora and their packing into fixed-length token contexts.

A corpus is the embedded default `pydoc` (Python's own `pydoc_data.topics`, on every CPython
install), a local .txt/.jsonl file or a folder of them, or a Hugging Face dataset streamed from the
hub. Documents are packed into contexts of exactly `ctx_len` tokens: BOS, then the tokens of
consecutive documents joined with EOS; a document that does not fit continues in the next context.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor

from hub_sae.io import local_path

DEFAULT_CORPUS = "pydoc"
LOCAL_SPLITS = ("train", "heldout")
HELDOUT_EVERY = 10
"""Every 10th document of pydoc and local corpora is held out."""
SUFFIXES = (".txt", ".jsonl")
SHUFFLE_BUFFER = 10_000
"""Documents an HF dataset's streamed shuffle draws from."""
CHUNK_CHARS = 16_384
"""Characters tokenized per call: a 48 MB paragraph in one call took 6.3 GB."""


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into batches."""

    corpus: str = DEFAULT_CORPUS
    """'pydoc' (embedded), a local .txt/.jsonl file or a folder of them, or an HF dataset 'name'
    or 'name:config' (streamed)."""
    split: str = "train"
    """'train' or 'heldout' for pydoc and local files (every 10th document is held out); the
    split name for HF datasets."""
    text_field: str = "text"
    """The field holding the text in .jsonl lines and HF dataset rows."""
    ctx_len: int = 128
    """Tokens per context, BOS included."""
    batch_size: int = 8
    """Contexts per batch."""
    seed: int = 0
    """Shuffles the document order (HF datasets: within a buffer of SHUFFLE_BUFFER documents)."""
    max_docs: int | None = None
    """Read at most this many documents (after the split and the shuffle)."""

    def __post_init__(self) -> None:
        if self.ctx_len < 2:
            raise ValueError(f"ctx_len must be at least 2 (BOS + one token); got {self.ctx_len}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {self.batch_size}.")


def is_local_corpus(corpus: str) -> bool:
    """Whether `corpus` is a local file or folder (True) or an HF dataset `owner/name[:config]`.

    The rule is `hub_sae.io.local_path`: a missing path, or a bare name, is an error.
    """
    if corpus == DEFAULT_CORPUS or Path(corpus).expanduser().exists():
        return True
    try:
        return local_path(corpus.partition(":")[0]) is not None
    except FileNotFoundError:
        raise FileNotFoundError(
            f"corpus {corpus!r} does not exist; give a .txt/.jsonl file or a folder of them, "
            f"{DEFAULT_CORPUS!r} or an HF dataset id (owner/name, or owner/name:config)."
        ) from None


def _read_file(path: Path, text_field: str) -> list[str]:
    """The documents of one file: blank-line-separated paragraphs of a .txt, lines of a .jsonl."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8 or move "
            "it out of the corpus."
        ) from None
    if path.suffix == ".txt":
        return [doc.strip() for doc in text.split("\n\n") if doc.strip()]
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{number} is not valid JSON ({e}); write one object per line."
            ) from None
        if not isinstance(row, dict) or text_field not in row:
            raise ValueError(
                f"{path}:{number} has no field {text_field!r}; set text_field to the field that "
                "holds the text."
            )
        if not isinstance(row[text_field], str):
            raise ValueError(
                f"{path}:{number}: field {text_field!r} is {json.dumps(row[text_field])[:40]}, "
                "not a string; fill it with the text or remove the line."
            )
        docs.append(row[text_field])
    return docs


def _local_documents(corpus: str, text_field: str) -> list[str]:
    """All documents of a local file or folder (its .txt/.jsonl files in sorted path order)."""
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise ValueError(f"folder {path} holds no .txt or .jsonl file.")
    elif path.suffix in SUFFIXES:
        files = [path]
    else:
        raise ValueError(f"corpus file {path} is neither .txt nor .jsonl; rename it or convert it.")
    return [doc for f in files for doc in _read_file(f, text_field)]


def _hf_texts(data: DataConfig) -> Iterator[str]:
    """The documents of an HF dataset split, streamed through a seeded shuffle buffer."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"corpus {data.corpus!r} is read as a Hugging Face dataset, which needs `datasets`: "
            "pip install datasets"
        ) from None
    name, _, config = data.corpus.partition(":")
    rows = datasets.load_dataset(name, config or None, split=data.split, streaming=True)
    rows = rows.shuffle(seed=data.seed, buffer_size=SHUFFLE_BUFFER)
    for row in islice(rows, data.max_docs):
        if data.text_field not in row:
            raise ValueError(
                f"dataset {data.corpus!r} has no field {data.text_field!r} "
                f"(fields: {', '.join(row)}); set text_field to the field that holds the text."
            )
        yield row[data.text_field]


def pydoc_documents(max_chars: int = 2000) -> list[str]:
    """Python's pydoc topics cut into distinct runs of whole paragraphs of ~`max_chars` characters.

    The 79 topics differ a lot in length, so holding out whole topics would leave a tiny,
    lopsided held-out split; chunks give one of about a tenth of the text.
    """
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        chunk = ""
        for paragraph in topics[key].split("\n\n"):
            if chunk and len(chunk) + len(paragraph) > max_chars:
                docs.append(chunk)
                chunk = ""
            chunk = f"{chunk}\n\n{paragraph}" if chunk else paragraph
        if chunk.strip():
            docs.append(chunk)
    return list(dict.fromkeys(docs))  # some topics repeat text: keep it on one side of the split


def iter_texts(data: DataConfig) -> Iterator[str]:
    """The documents of `data.corpus`'s split, in an order shuffled by `data.seed`.

    pydoc and local corpora are read in full here, so a missing file or an empty split fails at
    once; an HF dataset is streamed.
    """
    if not is_local_corpus(data.corpus):
        return _hf_texts(data)
    if data.split not in LOCAL_SPLITS:
        raise ValueError(
            f"split {data.split!r} is not one of {', '.join(LOCAL_SPLITS)} "
            f"(those of {data.corpus!r})."
        )
    if data.corpus == DEFAULT_CORPUS:
        docs = pydoc_documents()
    else:
        docs = _local_documents(data.corpus, data.text_field)
    heldout = data.split == "heldout"
    docs = [
        doc for i, doc in enumerate(docs) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == heldout
    ]
    if not docs:
        raise ValueError(
            f"corpus {data.corpus!r} holds no document in split {data.split!r} "
            f"(every {HELDOUT_EVERY}th document is held out); give it more text."
        )
    random.Random(data.seed).shuffle(docs)
    return iter(docs[: data.max_docs])


def chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """`text` in pieces of at most `size` characters, each cut just before a space or newline
    where the piece has one (so no word is split)."""
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = max(text.rfind(" ", start + 1, end + 1), text.rfind("\n", start + 1, end + 1))
        end = cut if cut > start else end
        yield text[start:end]
        start = end
    yield text[start:]


def pack(
    texts: Iterable[str], tokenizer, ctx_len: int, bos_token_id: int, eos_token_id: int
) -> Iterator[Tensor]:
    """Contexts of exactly `ctx_len` tokens: BOS + consecutive documents joined with EOS.

    A document that does not fit continues in the next context, after a new BOS; the final partial
    context is dropped. Long documents are tokenized in `chunks`, so memory stays bounded.
    """
    body = ctx_len - 1
    buffer: list[int] = []
    for i, text in enumerate(texts):
        if i:
            buffer.append(eos_token_id)
        for piece in chunks(text):
            buffer.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
            n_full = len(buffer) // body
            for j in range(n_full):
                row = [bos_token_id, *buffer[j * body : (j + 1) * body]]
                yield torch.tensor(row, dtype=torch.long)
            del buffer[: n_full * body]


def token_batches(
    data: DataConfig, tokenizer, bos_token_id: int, eos_token_id: int, skip_batches: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass over the corpus as (input_ids, attention_mask), both [batch_size, ctx_len] long.

    The final partial batch is dropped. `skip_batches` fast-forwards past that many batches (to
    resume); call again with another seed for the next epoch.
    """
    contexts = pack(iter_texts(data), tokenizer, data.ctx_len, bos_token_id, eos_token_id)
    contexts = islice(contexts, skip_batches * data.batch_size, None)
    while len(rows := list(islice(contexts, data.batch_size))) == data.batch_size:
        input_ids = torch.stack(rows)
        yield input_ids, torch.ones_like(input_ids)
