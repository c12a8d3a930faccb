"""`match_features` and `hub-sae analyze compare`: one-to-one matching of SAE features by decoder
cosine, checked against known answers (a permuted copy, a brute-force optimum) and on real suites."""

import itertools
import json

import pytest
import torch

from hub_sae import TopKSAE
from hub_sae.analysis.matching import match_features, paired_keys
from hub_sae.cli import main
from hub_sae.export import export
from hub_sae.training import TrainConfig, train
from tests.conftest import TINY_RUN


def random_sae(d_in: int, d_sae: int, seed: int) -> TopKSAE:
    torch.manual_seed(seed)
    return TopKSAE(d_in, d_sae, k=2)


def permuted(sae: TopKSAE, perm: torch.Tensor) -> TopKSAE:
    """A copy whose latent j is `sae`'s latent perm[j]."""
    copy = TopKSAE(sae.d_in, sae.d_sae, sae.k)
    copy.W_dec.data.copy_(sae.W_dec.data[perm])
    return copy


def test_a_permuted_copy_is_recovered_exactly_and_a_random_sae_scores_low():
    sae = random_sae(64, 256, seed=0)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(1))
    match = match_features(sae, permuted(sae, perm))
    assert torch.equal(match.pairs[:, 0], torch.arange(256))
    assert torch.equal(perm[match.pairs[:, 1]], match.pairs[:, 0])
    assert torch.allclose(match.cosine, torch.ones(256), atol=1e-6)
    assert match.above == {0.5: 1.0, 0.7: 1.0, 0.9: 1.0}

    unrelated = match_features(sae, random_sae(64, 256, seed=2))
    assert unrelated.mean < 0.4 and unrelated.above[0.7] == 0
    assert len(set(unrelated.pairs[:, 1].tolist())) == 256  # one to one


def test_the_assignment_is_the_brute_force_optimum():
    a, b = random_sae(4, 6, seed=3), random_sae(4, 6, seed=4)
    unit = [torch.nn.functional.normalize(s.W_dec.detach(), dim=1) for s in (a, b)]
    cos = unit[0] @ unit[1].T
    best = max(itertools.permutations(range(6)), key=lambda p: cos[range(6), p].sum().item())
    match = match_features(a, b)
    assert match.pairs[:, 1].tolist() == list(best)
    assert torch.allclose(match.cosine, cos[range(6), best])


def test_different_widths_pair_the_smaller_and_refuse_other_d_in():
    small, large = random_sae(8, 10, seed=5), random_sae(8, 16, seed=6)
    match = match_features(large, small)
    assert match.d_sae == (16, 10) and len(match.pairs) == 10
    assert len(set(match.pairs[:, 0].tolist())) == len(set(match.pairs[:, 1].tolist())) == 10
    with pytest.raises(ValueError, match="d_in=8 .* d_in=12"):
        match_features(small, random_sae(12, 10, seed=7))
    with pytest.raises(ValueError, match=r"16 x 10 latents .* at most 100 cells"):
        match_features(large, small, max_cells=100)
    with pytest.raises(ValueError, match="between -1 and 1"):
        match_features(small, small, thresholds=(0.5, float("nan")))


def test_layers_without_a_common_k_pair_the_nearest_k():
    assert paired_keys({1: [32, 64], 2: [8]}, {1: [64, 128], 3: [8]}) == [(1, 64, 64)]
    assert paired_keys({1: [32, 160]}, {1: [50, 80, 320]}) == [(1, 32, 50), (1, 160, 80)]


@pytest.fixture(scope="module")
def unmask_suite(tmp_path_factory):
    """The trained_suite's run again with the unmask policy and another seed."""
    out = tmp_path_factory.mktemp("unmask")
    run = {**TINY_RUN, "name": "tiny-unmask", "feature_tokens": 0, "eval_tokens": 256}
    return train(TrainConfig(output_dir=str(out), policy="unmask", seed=1, **run))


def test_compare_two_suites_writes_a_table_per_layer(trained_suite, unmask_suite, tmp_path):
    out = tmp_path / "cmp"
    assert (
        main(["analyze", "compare", str(trained_suite), str(unmask_suite), "--out", str(out)]) == 0
    )
    data = json.loads((out / "compare.json").read_text())
    assert [(r["layer"], r["k_a"], r["k_b"]) for r in data["results"]] == [(1, 8, 8), (3, 8, 8)]
    for r in data["results"]:
        a = TopKSAE.from_pretrained(trained_suite, layer=r["layer"])
        b = TopKSAE.from_pretrained(unmask_suite, layer=r["layer"])
        match = match_features(a, b)
        assert r["latent_b"] == match.pairs[:, 1].tolist()
        assert r["mean_cosine"] == pytest.approx(match.mean)
        assert r["above"]["0.5"] == match.above[0.5] and 0 < match.mean < 1
    table = (out / "compare.md").read_text()
    assert "| 3 | 8 | 8 | 768 × 768 |" in table and "cos > 0.9" in table
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("fmt", ["sparsify", "saelens"])
def test_an_export_matches_its_suite_exactly(trained_suite, tmp_path, fmt):
    export(trained_suite, fmt, tmp_path / fmt)
    out = tmp_path / "cmp"
    assert (
        main(["analyze", "compare", str(tmp_path / fmt), str(trained_suite), "--out", str(out)])
        == 0
    )
    results = json.loads((out / "compare.json").read_text())["results"]
    assert [r["layer"] for r in results] == TINY_RUN["layers"]
    for r in results:
        assert r["latent_a"] == r["latent_b"] == list(range(768))
        assert min(r["cosine"]) == pytest.approx(1, abs=1e-5)


def test_compare_refuses_suites_without_a_common_layer(trained_suite, tmp_path, capsys):
    export(trained_suite, "saelens", tmp_path / "one", layer=1)
    sae = TopKSAE.from_pretrained(trained_suite, layer=3)
    sae.save_pretrained(tmp_path / "three")
    argv = ["analyze", "compare", str(tmp_path / "one"), str(tmp_path / "three")]
    assert main([*argv, "--out", str(tmp_path / "cmp")]) == 1
    assert "(layers [1]) and" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
