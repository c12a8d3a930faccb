"""`hub-sae analyze insertion`: the plotted and written ΔLM / ΔCE per layer are those an
independent `evaluate_suite` call returns, signs kept; suites on the wrong side are refused."""

import json

import pytest

from hub_sae import TopKSAE
from hub_sae.analysis.insertion import run_insertion
from hub_sae.analysis.report import write_report
from hub_sae.cli import build_parser, main
from hub_sae.evaluate import T_BINS, evaluate_suite
from hub_sae.models import load_base_model
from hub_sae.suite import read_suite
from hub_sae.training import TrainConfig, train
from tests.checkpoints import write_tiny_qwen2
from tests.conftest import TINY_RUN

TOKENS = 512  # one held-out batch of 8 x 64 tokens per loss and t bin


@pytest.fixture(scope="module")
def ar_suite(tmp_path_factory):
    """A tiny suite of a tiny random Qwen2 causal LM, clean policy."""
    root = tmp_path_factory.mktemp("ar")
    model = str(write_tiny_qwen2(root / "qwen2"))
    run = {**TINY_RUN, "name": "qwen-clean", "feature_tokens": 0, "eval_tokens": 256}
    return train(TrainConfig(output_dir=str(root), model=model, policy="clean", **run))


def independent(suite) -> dict:
    """`evaluate_suite` on the suite's held-out text, as a user would call it."""
    info = read_suite(suite)
    saes = {(layer, 8): TopKSAE.from_pretrained(suite, layer=layer) for layer in info.layers}
    base = load_base_model(info.base_model)
    return evaluate_suite(
        base,
        saes,
        info.policy,
        info.corruption,
        info.heldout(seed=0),
        TOKENS,
        seed=0,
        splice_batches=1,
        by_t_batches=1,
        progress=False,
    )


def test_insertion_plots_what_evaluate_suite_returns(trained_suite, ar_suite, tmp_path):
    argv = ["analyze", "insertion", str(trained_suite), str(ar_suite), "--out", str(tmp_path)]
    argv += ["--device", "cpu"]
    report = run_insertion(build_parser().parse_args([*argv, "--max-tokens", str(TOKENS)]))
    data = json.loads((write_report(report, tmp_path / "out") / "insertion.json").read_text())
    dlm_axes, ar_axes = report.figure.axes

    expected = independent(trained_suite)
    layers = TINY_RUN["layers"]
    for i in range(len(T_BINS)):
        want = [expected[layer, 8]["by_t"][i]["dlm_scope_delta_lm_mask"] for layer in layers]
        assert list(dlm_axes.lines[i].get_ydata()) == want
        assert [
            data["dlm"]["layers"][str(layer)]["by_t"][i]["dlm_scope_delta_lm_mask"]
            for layer in layers
        ] == want
    mean = [expected[layer, 8]["dlm_scope_delta_lm_mask"] for layer in layers]
    assert list(dlm_axes.lines[len(T_BINS)].get_ydata()) == mean
    unmask = [expected[layer, 8]["dlm_scope_delta_lm_unmask"] for layer in layers]
    assert [
        data["dlm"]["layers"][str(layer)]["dlm_scope_delta_lm_unmask"] for layer in layers
    ] == unmask
    assert list(dlm_axes.lines[len(T_BINS) + 1].get_ydata()) == unmask

    expected_ar = independent(ar_suite)
    delta = [expected_ar[layer, 8]["next_token_delta_ce"] for layer in layers]
    assert list(ar_axes.lines[0].get_ydata()) == delta
    assert [data["ar"]["layers"][str(layer)]["next_token_delta_ce"] for layer in layers] == delta
    assert f"| {layers[0]} | {delta[0]:+.4f} |" in report.table

    # Signs are kept: every negative number measured is negative in the table and the JSON.
    negative = [v for v in [*unmask, *mean, *delta] if v < 0]
    assert negative, "the tiny suites measured no negative value to check"
    assert all(f"{v:+.4f}" in report.table for v in negative)
    assert min(dlm_axes.get_ylim()[0], ar_axes.get_ylim()[0]) < 0


def test_suites_on_the_wrong_side_are_refused_by_name(trained_suite, ar_suite, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "insertion", str(ar_suite), "--out", str(out)]) == 1
    assert f"SUITE {ar_suite} is a suite of the autoregressive model" in capsys.readouterr().err
    argv = ["analyze", "insertion", str(trained_suite), str(trained_suite), "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"SUITE_AR {trained_suite} is a suite of minilm (family mlm)" in err
    assert not out.exists()
