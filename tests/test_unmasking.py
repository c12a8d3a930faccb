"""The embedded default's fitted unmasking head: fit, cache, accuracy, and decoding with it."""

import torch
from safetensors import safe_open

from hub_sae.diffusion import generate
from hub_sae.models import load_base_model
from hub_sae.models.unmasking import (
    HEAD_FILE,
    HEAD_NAME,
    HeadFit,
    _masked_states,
    accuracy,
    load_or_fit_head,
    with_unmasking_head,
)

SMALL = HeadFit(fit_tokens=4096, heldout_tokens=2048)


def test_fit_is_cached_atomically_and_refit_when_settings_change(tmp_path, monkeypatch):
    monkeypatch.setenv("HUB_SAE_CACHE", str(tmp_path))
    base = load_base_model("minilm")
    head, meta = load_or_fit_head(base, SMALL)
    assert [p.name for p in tmp_path.iterdir()] == [HEAD_FILE]
    with safe_open(str(tmp_path / HEAD_FILE), "pt") as f:
        assert f.metadata()["name"] == HEAD_NAME and set(f.keys()) == set(head.FITTED)
    again, meta_again = load_or_fit_head(base, SMALL)
    assert meta_again == meta and torch.equal(again.dense.weight, head.dense.weight)
    assert again.decoder.weight is base.model.get_input_embeddings().weight  # tied, not copied
    other, other_meta = load_or_fit_head(base, HeadFit(fit_tokens=2048, heldout_tokens=2048))
    assert other_meta["fit_tokens"] == "2048" and not torch.equal(
        other.dense.weight, head.dense.weight
    )


def test_default_head_beats_the_most_common_heldout_token():
    base = with_unmasking_head(load_base_model("minilm"))
    assert base.has_lm_head and base.name == "minilm"
    encoder = load_base_model("minilm")
    with torch.no_grad():
        states, targets = _masked_states(encoder, "heldout", 8192, seed=1)
    most_common = float((targets == targets.mode().values).float().mean())
    assert accuracy(base.model.head, states, targets) > 1.5 * most_common
    prompt = base.tokenizer("The [MASK] statement leaves a loop.", return_tensors="pt").input_ids
    out = generate(base, prompt, steps=1, gen_length=0)
    assert base.tokenizer.decode(out.tokens[0, 2]) != "[MASK]"
