"""Activation capture, harvest and splice on the real embedded MiniLM."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from pydoc_data.topics import topics

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from hub_sae.activations import capture, harvest, harvest_text, splice
from hub_sae.data import DataConfig
from hub_sae.masking import Corruption
from hub_sae.models import BaseModel
from hub_sae.models.hf import load_hf

LAYERS = [1, 3, 5]


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return load_hf("minilm")


@pytest.fixture(scope="module")
def batch(base: BaseModel) -> tuple[torch.Tensor, torch.Tensor]:
    """4 x 48 tokens of pydoc prose, [CLS] first; the last row is right-padded after 30 tokens."""
    text = " ".join(topics[key] for key in sorted(topics)[:5])
    ids = base.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    rows = [[base.bos_token_id, *ids[i * 47 : (i + 1) * 47]] for i in range(4)]
    input_ids = torch.tensor(rows)
    attention_mask = torch.ones_like(input_ids)
    input_ids[3, 30:] = base.tokenizer.pad_token_id
    attention_mask[3, 30:] = 0
    return input_ids, attention_mask


def block_hooks(base: BaseModel) -> list[list[int]]:
    """Ids of the forward hooks on each block (transformers adds its own ones lazily)."""
    return [list(block._forward_hooks) for block in base.blocks]


def test_loads_embedded_default(base: BaseModel) -> None:
    assert (base.n_layers, base.d_model, base.mask_token_id) == (6, 384, 103)
    assert (base.bos_token_id, base.eos_token_id) == (101, 102)
    assert not base.has_lm_head and base.max_length == 512
    assert not any(p.requires_grad for p in base.model.parameters())
    assert not base.model.training


def test_loads_masked_lm_head(base: BaseModel, tmp_path) -> None:
    """A checkpoint with its masked-LM head keeps it: `run` returns logits over the vocabulary."""
    config = BertConfig(
        vocab_size=base.tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertForMaskedLM(config).save_pretrained(tmp_path)
    base.tokenizer.save_pretrained(tmp_path)
    tiny = load_hf(str(tmp_path))
    assert tiny.has_lm_head and tiny.n_layers == 3 and tiny.mask_token_id == 103
    logits = tiny.run(torch.tensor([[101, 2023, 103, 102]]))
    assert logits.shape == (1, 4, config.vocab_size)
    assert capture(tiny, torch.tensor([[101, 2023, 103, 102]]), None, [0])[0].shape == (1, 4, 32)


def test_capture_matches_hidden_states(base: BaseModel, batch) -> None:
    input_ids, attention_mask = batch
    with torch.no_grad():
        hidden = base.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        ).hidden_states
    hooks = block_hooks(base)
    acts = capture(base, input_ids, attention_mask, LAYERS)
    assert sorted(acts) == LAYERS
    for layer in LAYERS:
        torch.testing.assert_close(acts[layer], hidden[layer + 1], atol=1e-5, rtol=0)
    selected = attention_mask.bool()
    rows = capture(base, input_ids, attention_mask, LAYERS, selected)
    for layer in LAYERS:
        assert torch.equal(rows[layer], acts[layer][selected])
    assert block_hooks(base) == hooks


def count_block_calls(base: BaseModel, layers: list[int], after: int) -> int:
    """Calls of blocks deeper than `after` during one `capture` of `layers`."""
    calls = []
    handles = [
        block.register_forward_hook(lambda *_: calls.append(1))
        for block in base.blocks[after + 1 :]
    ]
    try:
        capture(base, torch.tensor([[101, 2023, 2003, 102]]), None, layers)
    finally:
        for handle in handles:
            handle.remove()
    return len(calls)


def test_forward_stops_after_deepest_block(base: BaseModel) -> None:
    assert count_block_calls(base, [1, 3], after=3) == 0
    assert count_block_calls(base, [1, 3, 5], after=3) == 2


def test_mask_harvest(base: BaseModel, batch) -> None:
    input_ids, attention_mask = batch
    generator = torch.Generator().manual_seed(0)
    out = harvest(base, input_ids, attention_mask, LAYERS, policy="mask", generator=generator)
    n = int(out.batch.is_masked.sum())
    assert n > 0
    assert torch.equal(out.batch.selected, out.batch.is_masked)
    assert torch.equal(out.positions, out.batch.is_masked.nonzero())
    assert all(out.acts[layer].shape == (n, base.d_model) for layer in LAYERS)
    assert out.token_ids.shape == (n,)
    b, t = out.positions.T
    assert (t > 0).all() and attention_mask[b, t].bool().all()
    assert torch.equal(out.token_ids, input_ids[b, t])
    assert (out.batch.input_ids[b, t] == base.mask_token_id).all()
    with torch.no_grad():
        hidden = base.model(
            input_ids=out.batch.input_ids, attention_mask=attention_mask, output_hidden_states=True
        ).hidden_states
    for layer in LAYERS:
        torch.testing.assert_close(out.acts[layer], hidden[layer + 1][b, t], atol=1e-5, rtol=0)


def test_hooks_removed_after_error_in_forward(base: BaseModel, batch) -> None:
    input_ids, attention_mask = batch

    def fail(*_) -> None:
        raise RuntimeError("boom")

    hooks = block_hooks(base)
    handle = base.blocks[2].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture(base, input_ids, attention_mask, LAYERS)
    finally:
        handle.remove()
    assert block_hooks(base) == hooks
    with pytest.raises(RuntimeError, match="boom"):
        with splice(base, 2, lambda h: fail()):
            base.run(input_ids, attention_mask)
    assert block_hooks(base) == hooks


def test_splice(base: BaseModel, batch) -> None:
    input_ids, attention_mask = batch
    hooks = block_hooks(base)
    with torch.no_grad():
        clean = base.run(input_ids, attention_mask)
        with splice(base, 3, lambda h: h):
            same = base.run(input_ids, attention_mask)
        with splice(base, 3, lambda h: h * 0.5):
            changed = base.run(input_ids, attention_mask)
        spliced = capture(base, input_ids, attention_mask, [3])[3]
        with splice(base, 3, lambda h: h * 0.5):
            seen = capture(base, input_ids, attention_mask, [3])[3]
    assert torch.equal(same, clean)
    assert (changed - clean).abs().max() > 1e-2
    torch.testing.assert_close(seen, spliced * 0.5)
    assert block_hooks(base) == hooks


@pytest.mark.parametrize("layers", [[6], [-1], [], [1, 9]])
def test_invalid_layer(base: BaseModel, batch, layers: list[int]) -> None:
    with pytest.raises(ValueError, match=r"0\.\.5"):
        capture(base, *batch, layers)


def test_harvest_text_cuts_at_max_tokens_and_rereads_only_when_asked(
    base: BaseModel, tmp_path
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(topics[key] for key in sorted(topics)[:2]))
    data = DataConfig(corpus=str(corpus), ctx_len=32, batch_size=4)

    def run(max_tokens: int, passes: int | None = 1):
        return [
            h
            for *_, h in harvest_text(
                base, data, [1, 3], "mask", Corruption(), max_tokens, passes=passes
            )
        ]

    whole = run(10**9)  # one pass ends with the text
    total = sum(len(h.token_ids) for h in whole)
    assert len(whole) > 2 and total > 0

    cut = run(total // 2 + 1)
    assert sum(len(h.token_ids) for h in cut) == total // 2 + 1
    last, same = cut[-1], whole[len(cut) - 1]
    n = len(last.token_ids)
    assert len(last.positions) == n and all(len(a) == n for a in last.acts.values())
    assert torch.equal(last.acts[3], same.acts[3][:n])  # a prefix of the same corrupted batch
    assert torch.equal(last.positions, same.positions[:n])

    again = run(2 * total + 5, passes=None)  # reads further passes, with fresh corruption
    assert sum(len(h.token_ids) for h in again) == 2 * total + 5


def test_harvest_text_progress_bar_counts_positions(base: BaseModel, tmp_path, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(topics[sorted(topics)[0]])
    data = DataConfig(corpus=str(corpus), ctx_len=32, batch_size=4)
    harvests = harvest_text(base, data, [1], "mask", Corruption(), 50, passes=None, progress="scan")
    assert sum(len(h.token_ids) for *_, h in harvests) == 50
    bar = capsys.readouterr().err
    assert "scan: 100%" in bar and "50/50" in bar

    list(harvest_text(base, data, [1], "mask", Corruption(), 50, passes=None))
    assert capsys.readouterr().err == ""  # no label, no bar
