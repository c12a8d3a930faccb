"""DLM-Scope steering on the embedded default (MiniLM + the tiny trained suite): the relative steer
against DESIGN's formula, at every step of both samplers; the sweep's metrics against independent
computations on its real decodes; value 0 against the unsteered decode; bad input; the command."""

import json
import math

import pytest
import torch

from hub_sae.analysis.report import open_suite, prompt_ids
from hub_sae.analysis.steering import steering_sweep
from hub_sae.cli import main
from hub_sae.diffusion import Steer, diffusion_generate, generate, steer_residual

LAYER = 3
TEXT = "The function returns a list of the values in the dictionary, sorted by key."
PROMPTS = ["The weather today is", "def main():"]


@pytest.fixture(scope="module")
def suite(trained_suite):
    return open_suite(trained_suite)


def hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def layer_output(base, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """[B, T, d] block `layer`'s output, read by a plain forward hook."""
    seen = []
    handle = base.blocks[layer].register_forward_hook(lambda m, a, out: seen.append(hidden(out)))
    try:
        with torch.no_grad():
            base.run(ids)
    finally:
        handle.remove()
    return seen[0]


def dense_codes(sae, h: torch.Tensor) -> torch.Tensor:
    """[n, d_sae] the SAE's activations of each row, zeros outside its top k."""
    acts, indices = sae.encode(h)
    return torch.zeros(len(h), sae.d_sae).scatter(1, indices, acts.float())


def firing(suite, at_least: int) -> int:
    """A feature of LAYER that fires at `at_least` positions or more of TEXT."""
    h = layer_output(suite.base, suite.base.tokenizer(TEXT, return_tensors="pt").input_ids, LAYER)
    counts = (dense_codes(suite.saes[LAYER], h[0]) > 0).sum(0)
    return int(torch.nonzero(counts >= at_least)[0])


def test_relative_steer_is_designs_formula_on_real_activations(suite):
    sae = suite.saes[LAYER]
    h = layer_output(suite.base, suite.base.tokenizer(TEXT, return_tensors="pt").input_ids, LAYER)[
        0
    ]
    codes = dense_codes(sae, h)
    for feature in (firing(suite, 3), int(torch.nonzero(codes.sum(0) == 0)[0])):
        got = steer_residual(sae, h, Steer(LAYER, (feature,), 2.5, "relative", positions="all"))
        for p in range(len(h)):  # decode(z with z_f += value x max_j z_j) + the SAE error
            z = codes[p].clone()
            error = h[p] - (z @ sae.W_dec + sae.b_dec)
            z[feature] += 2.5 * codes[p].max()
            assert torch.allclose(got[p], z @ sae.W_dec + sae.b_dec + error, atol=1e-4)


def test_top_positions_are_where_the_feature_fires_most(suite):
    sae, base = suite.saes[LAYER], suite.base
    ids = base.tokenizer(TEXT, return_tensors="pt").input_ids
    h = layer_output(base, ids, LAYER)
    acts = dense_codes(sae, h[0])
    feature = firing(suite, 3)
    never = int(torch.nonzero(acts.sum(0) == 0)[0])
    for f, n in ((feature, 2), (feature, 100), (never, 2)):
        steer = Steer(LAYER, (f,), 1.0, "relative", positions="top", top_positions=n)
        fired = [p for p in range(ids.shape[1]) if acts[p, f] > 0]
        expected = sorted(fired, key=lambda p: (-acts[p, f], p))[:n]
        where = steer.where(sae, h, ids, base.mask_token_id)
        assert where.shape == ids.shape and where[0].nonzero().flatten().tolist() == sorted(
            expected
        )


@pytest.mark.parametrize("sampler", ["llada", "dream"])
def test_the_steer_acts_at_every_step_of_both_samplers(suite, sampler):
    base, sae = suite.base, suite.saes[LAYER]
    ids = base.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    steer = Steer(LAYER, (firing(suite, 3),), 4.0, "relative", positions="all")
    before, after = [], []
    hooks = [
        base.blocks[LAYER].register_forward_hook(lambda m, a, out: before.append(hidden(out))),
        base.blocks[LAYER + 1].register_forward_pre_hook(lambda m, args: after.append(args[0])),
    ]
    try:
        saes = {LAYER: sae}
        if sampler == "llada":
            generate(base, ids, 4, 8, 8, saes=saes, steering=[steer])
        else:
            diffusion_generate(base, ids, 8, 4, alg="entropy", saes=saes, steering=[steer])
    finally:
        for hook in hooks:
            hook.remove()
    assert len(before) == len(after) == 4
    for h, steered in zip(before, after, strict=True):
        assert not torch.allclose(h, steered)
        assert torch.allclose(steered[0], steer_residual(sae, h[0], steer), atol=1e-5)


@pytest.mark.parametrize("sampler", ["llada", "dream"])
def test_sweep_metrics_on_real_decodes_and_value_zero_is_unsteered(suite, sampler):
    base, sae = suite.base, suite.saes[LAYER]
    feature = firing(suite, 3)
    sweep = steering_sweep(
        base, suite.saes, PROMPTS, LAYER, feature, [0, 32], sampler=sampler, gen_length=8, steps=4
    )
    assert [p.value for p in sweep.points] == [0.0, 32.0]
    for i, prompt in enumerate(PROMPTS):
        ids = prompt_ids(base, prompt)
        if sampler == "llada":
            plain = generate(base, ids, 4, 8, 8).tokens[0]
        else:
            plain = diffusion_generate(base, ids, 8, 4, alg="entropy").tokens[0]
        assert torch.equal(sweep.points[0].tokens[i], plain)
        assert sweep.decoded[i].tolist() == [p >= ids.shape[1] for p in range(ids.shape[1] + 8)]
    steered = sweep.points[1]
    assert any(
        not torch.equal(a, b) for a, b in zip(steered.tokens, sweep.points[0].tokens, strict=True)
    )
    for point in sweep.points:
        for i, tokens in enumerate(point.tokens):
            generated = tokens[-8:]
            codes = dense_codes(sae, layer_output(base, tokens[None], LAYER)[0, -8:])
            assert point.concept[i] == pytest.approx(float(codes[:, feature].mean()), abs=1e-5)
            seen = generated.tolist()
            repeats = sum(token in seen[:j] for j, token in enumerate(seen))
            assert point.repeated[i] == pytest.approx(repeats / 8)
            assert math.isfinite(point.log_likelihood[i]) and point.log_likelihood[i] < 0
    assert steered.mean("concept") > sweep.points[0].mean("concept")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"feature": 10**6}, r"Steer feature id\(s\) \[1000000\] are out of range .* pick ids"),
        ({"values": [1.0, float("nan")]}, r"must be finite numbers; got \[nan\]"),
        ({"values": [float("inf")]}, r"must be finite numbers; got \[inf\]"),
        ({"values": []}, "no steering value given: pass at least one"),
        ({"layer": 2}, r"layer 2 has no SAE here \(layers with one: \[1, 3\]\): steer one"),
        ({"sampler": "gibbs"}, "sampler 'gibbs': choose one of llada, dream"),
        ({"mode": "double"}, "Steer mode 'double': choose one of clamp, add, relative"),
        ({"positions": "best"}, "Steer positions 'best': use 'masked', 'all', 'top'"),
        ({"top_positions": 0}, "Steer top_positions must be a whole number >= 1; got 0"),
        ({"gen_length": 0}, "prompt 1 holds no mask token and gen_length is 0"),
    ],
)
def test_bad_input_is_refused_with_the_fix(suite, change, error):
    args = dict(layer=LAYER, feature=0, values=[0, 1], gen_length=4, steps=4) | change
    with pytest.raises(ValueError, match=error):
        steering_sweep(suite.base, suite.saes, PROMPTS, **args)


def test_analyze_steer_command(suite, trained_suite, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["analyze", "steer", str(trained_suite), "--layer", str(LAYER), "--prompts"]
    common += [str(prompts), "--gen-length", "4", "--steps", "4", "--device", "cpu"]
    feature = str(firing(suite, 3))
    out = tmp_path / "out"
    assert main([*common, "--feature", feature, "--values", "0", "2", "--out", str(out)]) == 0
    data = json.loads((out / "steer.json").read_text())
    assert [p["value"] for p in data["points"]] == [0.0, 2.0] and data["mode"] == "relative"
    assert len(data["points"][0]["outputs"]) == 2 and (out / "steer.png").stat().st_size
    table = (out / "steer.md").read_text()
    assert table.count("\n| 0 |") == 1 and table.count("\n| 2 |") == 1
    assert "| value | concept |" in capsys.readouterr().out
    bad = ["--feature", feature, "--values", "nan", "--out", str(tmp_path / "bad")]
    assert main([*common, *bad]) == 1
    assert "steering values must be finite numbers" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
