"""Evaluation the DLM way: metrics by masking ratio, both spliced losses, on a real trained suite."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hub_sae.data import DataConfig
from hub_sae.evaluate import (
    METRICS,
    T_BINS,
    by_t_summary,
    evaluate_by_t,
    masked_lm_loss,
    unmasked_lm_loss,
)
from hub_sae.masking import CorruptedBatch
from hub_sae.models import load_base_model
from hub_sae.models.unmasking import with_unmasking_head
from hub_sae.sae import TopKSAE
from hub_sae.suite import layer_folders


def test_losses_weight_masked_by_1_over_t_and_visible_by_1_over_1_minus_t():
    logits = torch.randn(2, 4, 7)
    targets = torch.randint(7, (2, 4))
    is_masked = torch.tensor([[False, True, False, True], [False, False, True, False]])
    p = torch.tensor([0.25, 0.5])
    batch = CorruptedBatch(targets, is_masked, p, is_masked)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 4)
    masked = (ce[0, 1] + ce[0, 3]) / 0.25 + ce[1, 2] / 0.5
    visible = ce[0, 2] / 0.75 + (ce[1, 1] + ce[1, 3]) / 0.5  # position 0 (BOS) never counts
    assert torch.isclose(masked_lm_loss(logits, targets, batch), masked / 8)
    assert torch.isclose(unmasked_lm_loss(logits, targets, batch), visible / 8)


def test_metric_names_are_unmistakable_and_defined():
    keys = [m.key for m in METRICS]
    assert len(set(keys)) == len(keys) and all(m.meaning for m in METRICS)
    assert {"dlm_scope_delta_lm_mask", "dlm_scope_delta_lm_unmask"} <= set(keys)
    assert "policy_splice_delta_ce" in keys and "delta_loss" not in keys


@pytest.fixture(scope="module")
def by_t(trained_suite):
    base = with_unmasking_head(load_base_model("minilm"))
    saes = {
        key: TopKSAE.from_pretrained(f).eval() for key, f in layer_folders(trained_suite).items()
    }
    data = DataConfig(split="heldout", ctx_len=64, batch_size=4)
    return evaluate_by_t(base, saes, data, batches_per_bin=1, seed=0)


def test_by_t_bins_split_masked_and_unmasked_positions(by_t):
    for rows in by_t.values():
        assert [(r["t_min"], r["t_max"]) for r in rows] == list(T_BINS)
        for r in rows:
            assert r["t_min"] <= r["t_mean"] < r["t_max"]
            share = r["masked_tokens"] / (r["masked_tokens"] + r["unmasked_tokens"])
            assert abs(share - r["t_mean"]) < 0.2  # one batch of 4 x 63 positions
            assert all(math.isfinite(r[k]) for k in ("fvu_masked", "fvu_unmasked", "l0_masked"))
            assert r["l0_masked"] <= 8 and r["l0_unmasked"] <= 8
            assert math.isfinite(r["dlm_scope_delta_lm_mask"])
        summary = by_t_summary(rows)
        assert summary["dlm_scope_delta_lm_mask"] == pytest.approx(
            sum(r["dlm_scope_delta_lm_mask"] for r in rows[:5]) / 5
        )


def test_a_mask_policy_sae_reconstructs_masked_positions_better(by_t):
    """Trained on masked positions only, the SAEs fit them better than the visible tokens."""
    for rows in by_t.values():
        inside = rows[:5]
        assert sum(r["fvu_masked"] for r in inside) < sum(r["fvu_unmasked"] for r in inside)


def test_trained_suite_metrics_hold_both_spliced_losses_and_the_bins(trained_suite):
    for folder in layer_folders(trained_suite).values():
        metrics = json.loads((folder / "metrics.json").read_text())
        assert len(metrics["by_t"]) == len(T_BINS)
        for key in ("dlm_scope_delta_lm_mask", "dlm_scope_delta_lm_unmask"):
            assert math.isfinite(metrics[key])
        assert metrics["policy_splice_ce_clean"] > 0
        assert metrics["policy_splice_delta_ce"] == pytest.approx(
            metrics["policy_splice_ce_spliced"] - metrics["policy_splice_ce_clean"]
        )
