"""Evaluation the DLM way: metrics by masking ratio, both spliced losses, on a real trained suite."""

import itertools
import json
import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from hub_sae.activations import capture, harvest_text, splice
from hub_sae.data import DataConfig, token_batches
from hub_sae.evaluate import (
    METRICS,
    T_BINS,
    by_t_summary,
    evaluate_by_t,
    evaluate_suite,
    masked_lm_loss,
    predictions,
    unmasked_lm_loss,
)
from hub_sae.masking import CorruptedBatch, Corruption, corrupt
from hub_sae.models import BaseModel, load_base_model
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


SPLICED = ("policy_splice", "next_token", "cosine_", "rel_mse_", "output_recovered")
"""Prefixes of the metrics the spliced runs give."""


def reference_splice(base: BaseModel, sae: TopKSAE, batches: list) -> dict[str, float]:
    """The spliced metrics of one SAE as before the runs were shared: per batch, its own clean,
    spliced and zero-ablated runs (masked-token loss, or output similarity without an LM head)."""
    sums: dict[str, float] = defaultdict(float)
    for input_ids, attention_mask, batch in batches:
        selected = batch.selected

        def reconstruct(h, selected=selected):
            h = h.clone()
            h[selected] = sae(h[selected]).reconstruction
            return h

        out = {"clean": predictions(base, batch.input_ids, attention_mask)}
        for name, fn in (
            ("spliced", reconstruct),
            ("zero", lambda h, selected=selected: h.masked_fill(selected[..., None], 0)),
        ):
            with splice(base, sae.layer, fn):
                out[name] = predictions(base, batch.input_ids, attention_mask)
        if base.has_lm_head:
            if batch.is_masked.any():
                for name, logits in out.items():
                    sums[f"policy_splice_ce_{name}"] += float(
                        masked_lm_loss(logits, input_ids, batch)
                    )
            continue
        real = attention_mask.bool()
        clean = out["clean"][real].float()
        for name in ("spliced", "zero"):
            other = out[name][real].float()
            sums[f"cosine_{name}"] += float(F.cosine_similarity(other, clean, dim=-1).mean())
            sums[f"rel_mse_{name}"] += float((other - clean).pow(2).sum() / clean.pow(2).sum())
    m = {name: value / len(batches) for name, value in sums.items()}
    if base.has_lm_head:
        clean, spliced, zero = (m[f"policy_splice_ce_{r}"] for r in ("clean", "spliced", "zero"))
        m["policy_splice_loss_recovered"] = (zero - spliced) / (zero - clean)
        m["policy_splice_delta_ce"] = spliced - clean
    else:
        m["output_recovered"] = 1 - m["rel_mse_spliced"] / m["rel_mse_zero"]
    return m


def reference_by_t(base: BaseModel, sae: TopKSAE, data: DataConfig, seed: int) -> list[dict]:
    """One SAE's rows by t as before: per bin a capture run, a clean run and a spliced run of one
    held-out batch, masked with the same draws as `evaluate_by_t`."""
    ((input_ids, attention_mask),) = itertools.islice(
        token_batches(data, base.tokenizer, base.bos_token_id, base.eos_token_id), 1
    )
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for t_min, t_max in T_BINS:
        corruption = Corruption(t_min=t_min, t_max=t_max)
        batch = corrupt(input_ids, attention_mask, base.mask_token_id, "all", corruption, generator)
        h = capture(base, batch.input_ids, attention_mask, [sae.layer])[sae.layer]
        out = sae(h.flatten(0, 1))
        recon = out.reconstruction.view_as(h)
        active = (out.latents.top_acts > 0).sum(-1).view(h.shape[:2])
        row = {"t_min": t_min, "t_max": t_max, "t_mean": float(batch.p[0])}
        for group, where in (
            ("masked", batch.is_masked),
            ("unmasked", batch.selected & ~batch.is_masked),
        ):
            x, x_hat = h[where].double(), recon[where].double()
            n = len(x)
            total = x.pow(2).sum().item() - x.sum(0).pow(2).sum().item() / n
            row[f"{group}_tokens"] = n
            row[f"fvu_{group}"] = (x - x_hat).pow(2).sum().item() / total
            row[f"l0_{group}"] = float(active[where].sum()) / n
        if base.has_lm_head:
            clean = predictions(base, batch.input_ids, attention_mask)
            with splice(base, sae.layer, lambda _, recon=recon: recon):
                spliced = predictions(base, batch.input_ids, attention_mask)
            for variant, loss in (("mask", masked_lm_loss), ("unmask", unmasked_lm_loss)):
                delta = loss(spliced, input_ids, batch) - loss(clean, input_ids, batch)
                row[f"dlm_scope_delta_lm_{variant}"] = float(delta)
        rows.append(row)
    return rows


def same(a, b) -> bool:
    """Equal, NaN included (a metric that cannot be measured is NaN in both)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@torch.no_grad()
def assert_shared_runs_change_nothing(base: BaseModel, saes: dict) -> None:
    """evaluate_suite's metrics equal, bit for bit, those of one clean and one zero-ablated run
    per SAE (`reference_splice`) and of a capture run per SAE and bin (`reference_by_t`)."""
    data = DataConfig(split="heldout", ctx_len=64, batch_size=4)
    corruption = Corruption()
    metrics = evaluate_suite(
        base, saes, "mask", corruption, data, 512, seed=3, splice_batches=2, progress=False
    )
    layers = sorted({layer for layer, _ in saes})
    harvested = harvest_text(base, data, layers, "mask", corruption, 512, seed=3, passes=None)
    kept = [(ids, mask, h.batch) for ids, mask, h in itertools.islice(harvested, 2)]
    for key, sae in saes.items():
        expected = reference_splice(base, sae, kept)
        got = {name: v for name, v in metrics[key].items() if name.startswith(SPLICED)}
        assert same(got, expected), key
        assert same(metrics[key]["by_t"], reference_by_t(base, sae, data, seed=3)), key


def test_shared_clean_and_zeroed_runs_give_the_metrics_of_one_run_per_sae(trained_suite):
    """Two k on layer 1 share its zero-ablated run; all three SAEs share the clean run."""
    base = with_unmasking_head(load_base_model("minilm"))
    saes = {
        key: TopKSAE.from_pretrained(f).eval() for key, f in layer_folders(trained_suite).items()
    }
    k16 = TopKSAE(saes[1, 8].d_in, saes[1, 8].d_sae, 16, layer=1, base_model="minilm")
    k16.load_state_dict(saes[1, 8].state_dict())
    saes[1, 16] = k16.eval()
    assert_shared_runs_change_nothing(base, saes)
