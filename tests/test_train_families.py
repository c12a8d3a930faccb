"""`accelerate launch training/train.py` end to end on tiny random checkpoints of each family:
Dream (mask, unmask), the autoregressive baseline (clean policy; mask refused) and a masked LM."""

import json
import random
from pathlib import Path

import pytest

from hub_sae import TopKSAE
from hub_sae.cards import render_card, suite_spec
from hub_sae.suite import validate_suite
from hub_sae.training import TrainConfig, train
from tests.checkpoints import (
    DREAM_SPECIAL,
    DREAM_WORDS,
    write_tiny_bert,
    write_tiny_dream,
    write_tiny_qwen2,
)
from tests.conftest import TINY_RUN, finish, launch


def layer_metrics(suite: Path, layer: int) -> dict:
    return json.loads((suite / f"layer_{layer}" / "metrics.json").read_text())


@pytest.mark.slow
def test_launch_trains_a_causal_lm_with_the_clean_policy_and_refuses_mask(tmp_path):
    model = str(write_tiny_qwen2(tmp_path / "qwen2"))
    refused = finish(launch(tmp_path / "runs", model=model, name="qwen-mask"), ok=False)
    assert "mask policy 'mask'" in refused and "never trained on masked inputs" in refused
    assert "--policy clean" in refused
    assert not (tmp_path / "runs" / "qwen-mask").exists()

    finish(launch(tmp_path / "runs", model=model, policy="clean", name="qwen-clean"))
    suite = tmp_path / "runs" / "qwen-clean"
    info = json.loads((suite / "suite.json").read_text())
    assert (info["base_model"], info["policy"]) == (model, "clean")
    assert validate_suite(suite, require_card=False) == []
    for layer in TINY_RUN["layers"]:
        sae = TopKSAE.from_pretrained(suite, layer=layer)
        assert (sae.layer, sae.k, sae.d_in, sae.policy) == (layer, 8, 32, "clean")
        metrics = layer_metrics(suite, layer)
        assert 0 < metrics["fvu"] < 1 and metrics["l0"] <= 8
        assert metrics["next_token_ce_clean"] > 0 and "next_token_delta_ce" in metrics
        assert not any(key.startswith(("policy_splice", "dlm_scope", "by_t")) for key in metrics)
    card = str(render_card(suite_spec(suite, "me/tiny-qwen-clean"))).splitlines()
    header = next(line for line in card if line.startswith("| layer | k |"))  # the metric table
    assert "delta next-token CE" in header and "policy splice" not in header
    assert "| corruption | none: the clean policy reads uncorrupted text |" in card


@pytest.mark.slow
def test_a_masked_lm_with_its_head_trains_with_the_mask_policy(tmp_path):
    model = str(write_tiny_bert(tmp_path / "bert"))
    run = {**TINY_RUN, "total_tokens": 2048, "eval_tokens": 512, "feature_tokens": 0}
    suite = train(TrainConfig(output_dir=str(tmp_path / "runs"), model=model, **run))
    for layer in TINY_RUN["layers"]:
        assert TopKSAE.from_pretrained(suite, layer=layer).policy == "mask"
        metrics = layer_metrics(suite, layer)
        assert metrics["fvu"] > 0 and metrics["policy_splice_ce_clean"] > 0
        assert {"policy_splice_delta_ce", "dlm_scope_delta_lm_mask"} <= metrics.keys()
        assert not any(key.startswith("next_token") for key in metrics)


def dream_corpus(path: Path, paragraphs: int = 600) -> Path:
    """A .txt corpus in the tiny Dream's words (one document per paragraph)."""
    words = DREAM_WORDS[len(DREAM_SPECIAL) + 1 :]
    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choices(words, k=24)) for _ in range(paragraphs))
    path.write_text(text)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mask", "unmask"])
def test_launch_trains_dream(tmp_path, policy):
    model = str(write_tiny_dream(tmp_path / "dream"))
    corpus = str(dream_corpus(tmp_path / "corpus.txt"))
    run = dict(model=model, corpus=corpus, policy=policy, name=f"dream-{policy}", layers=[0, 2])
    finish(launch(tmp_path / "runs", total_tokens=3072, eval_tokens=512, **run))
    suite = tmp_path / "runs" / f"dream-{policy}"
    assert validate_suite(suite, require_card=False) == []
    for layer in (0, 2):
        sae = TopKSAE.from_pretrained(suite, layer=layer)
        assert (sae.base_model, sae.policy, sae.d_in) == (model, policy, 32)
        metrics = layer_metrics(suite, layer)
        assert 0 < metrics["fvu"] < 1 and metrics["policy_splice_ce_clean"] > 0
        assert [row["t_min"] for row in metrics["by_t"]][:1] == [0.05]
        assert all(row["masked_tokens"] > 0 for row in metrics["by_t"])
