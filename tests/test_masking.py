"""The corruption process and the policies that pick positions."""

import pytest
import torch

from hub_sae.masking import Corruption, check_selects, corrupt, select_positions

MASK = 99


def batch(rows: int = 64, length: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids 1..length-1 after a BOS (0); the last 50 positions of odd rows are pads."""
    ids = torch.arange(length).repeat(rows, 1)
    attention_mask = torch.ones_like(ids)
    attention_mask[1::2, -50:] = 0
    return ids, attention_mask


def test_dlm_scope_one_probability_per_batch_within_range() -> None:
    ids, attention_mask = batch()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = corrupt(ids, attention_mask, MASK, "mask", Corruption(t_min=0.2, t_max=0.3), g)
        assert torch.all(out.p == out.p[0]) and 0.2 <= out.p[0] <= 0.3
        real = attention_mask.bool().clone()
        real[:, 0] = False
        share = out.is_masked[real].float().mean()
        assert abs(share - out.p[0]) < 0.03
        assert torch.equal(out.input_ids[out.is_masked], torch.full_like(ids[out.is_masked], MASK))
        assert torch.equal(out.input_ids[~out.is_masked], ids[~out.is_masked])


def test_bos_and_pads_never_masked_nor_selected() -> None:
    ids, attention_mask = batch()
    g = torch.Generator().manual_seed(1)
    for policy in ("mask", "unmask", "all", "clean"):
        out = corrupt(ids, attention_mask, MASK, policy, Corruption(t_min=1.0, t_max=1.0), g)
        pads = attention_mask == 0
        assert not out.is_masked[:, 0].any() and not out.is_masked[pads].any()
        assert not out.selected[:, 0].any() and not out.selected[pads].any()


def test_policies_select_their_positions() -> None:
    ids, attention_mask = batch()
    runs = {
        policy: corrupt(
            ids, attention_mask, MASK, policy, generator=torch.Generator().manual_seed(2)
        )
        for policy in ("mask", "unmask", "all", "clean")
    }
    real = attention_mask.bool().clone()
    real[:, 0] = False
    masked = runs["mask"].is_masked
    assert torch.equal(runs["mask"].selected, masked)
    assert torch.equal(runs["unmask"].selected, real & ~masked)
    assert torch.equal(runs["all"].selected, real)
    assert torch.equal(runs["all"].input_ids, runs["mask"].input_ids)  # same seed, same corruption
    assert torch.equal(runs["clean"].input_ids, ids) and not runs["clean"].is_masked.any()
    assert torch.equal(runs["clean"].selected, real)


def test_llada_schedule_draws_one_probability_per_sequence() -> None:
    ids, attention_mask = batch(rows=256)
    out = corrupt(
        ids,
        attention_mask,
        MASK,
        "mask",
        Corruption("llada", eps=1e-3),
        torch.Generator().manual_seed(3),
    )
    assert out.p.unique().numel() == 256
    assert out.p.min() >= 1e-3 and out.p.max() <= 1
    assert 0.4 < out.p.mean() < 0.6  # t ~ U(0, 1)
    per_row = out.is_masked[:, 1:150].float().mean(1)  # no pads in the first 150 positions
    assert torch.corrcoef(torch.stack([per_row, out.p]))[0, 1] > 0.95


def test_seeded_generator_is_deterministic() -> None:
    ids, attention_mask = batch()
    a = corrupt(ids, attention_mask, MASK, "mask", generator=torch.Generator().manual_seed(7))
    b = corrupt(ids, attention_mask, MASK, "mask", generator=torch.Generator().manual_seed(7))
    c = corrupt(ids, attention_mask, MASK, "mask", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.is_masked, b.is_masked) and torch.equal(a.p, b.p)
    assert not torch.equal(a.is_masked, c.is_masked)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"schedule": "cosine"},
            "unknown corruption schedule 'cosine'; choose one of dlm_scope, llada",
        ),
        ({"t_min": 0.6, "t_max": 0.5}, "t_min <= t_max"),
    ],
)
def test_bad_corruption_is_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Corruption(**kwargs)


def test_unknown_policy_lists_policies() -> None:
    with pytest.raises(
        ValueError, match="unknown mask policy 'masked'; choose one of mask, unmask, all, clean"
    ):
        select_positions(torch.zeros(2, 3, dtype=torch.bool), None, "masked")


@pytest.mark.parametrize(
    ("policy", "corruption", "message"),
    [
        ("mask", Corruption(t_min=0, t_max=0), "policy 'mask' with t_max 0 .* --t_max 0.5"),
        ("unmask", Corruption(t_min=1, t_max=1), "policy 'unmask' .* lower --t_min"),
        ("unmask", Corruption("llada", eps=1), "policy 'unmask' with llada .* --policy all"),
    ],
)
def test_settings_that_select_nothing_are_refused(
    policy: str, corruption: Corruption, message: str
) -> None:
    """Each refused setting indeed selects nothing; the same policy one step away does select."""
    ids, attention_mask = batch()
    out = corrupt(ids, attention_mask, MASK, policy, corruption, torch.Generator().manual_seed(0))
    assert not out.selected.any()
    with pytest.raises(ValueError, match=message):
        check_selects(policy, corruption)
    for fine in (Corruption(t_min=0, t_max=0.01), Corruption(t_min=0.99, t_max=1)):
        check_selects(policy, fine)
    check_selects("all", corruption)
