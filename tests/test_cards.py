"""Model cards: valid metadata whose model-index matches metrics.json, a working load snippet, and
the committed LLaDA release card."""

import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, metadata_load

from hub_sae.cards import (
    BIBTEX,
    CARD_FILE,
    DIGITS,
    METRICS,
    PLOT_FILE,
    release_spec,
    suite_spec,
    write_card,
)
from hub_sae.suite import layer_folders, read_suite

ROOT = Path(__file__).resolve().parents[1]
LLADA_CARD = ROOT / "model_cards" / "llada-8b-mask"
LLADA_CONFIG = ROOT / "training" / "configs" / "llada-8b-mask.yaml"
REQUIRED_TAGS = {
    "sparse-autoencoder",
    "interpretability",
    "diffusion-language-model",
    "mechanistic-interpretability",
}
REPO_ID = "someone/tiny-mask"


@pytest.fixture(scope="module")
def carded_suite(trained_suite: Path, tmp_path_factory) -> Path:
    """A copy of the trained suite with its card written for REPO_ID."""
    root = tmp_path_factory.mktemp("carded") / trained_suite.name
    shutil.copytree(trained_suite, root)
    write_card(suite_spec(root, REPO_ID), root)
    return root


def python_block(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_card_metadata_is_valid_and_model_index_matches_metrics(carded_suite):
    card = ModelCard.load(carded_suite / CARD_FILE)
    data = card.data
    assert data.library_name == "hub-sae"
    assert REQUIRED_TAGS <= set(data.tags)
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.license == "apache-2.0"
    assert metadata_load(carded_suite / CARD_FILE)["model-index"][0]["name"] == REPO_ID

    listed = set()
    for result in data.eval_results:
        metrics = json.loads((carded_suite / result.metric_config / "metrics.json").read_text())
        assert result.metric_value == round(metrics[result.metric_type], DIGITS)
        assert result.dataset_split == "heldout"
        listed.add((result.metric_config, result.metric_type))
    expected = {
        (folder.relative_to(carded_suite).as_posix(), m.key)
        for folder in layer_folders(carded_suite).values()
        for m in METRICS
        if m.key in json.loads((folder / "metrics.json").read_text())
    }
    assert listed == expected
    assert {"fvu", "variance_explained", "l0", "dead_share"} <= {key for _, key in listed}


def test_card_snippet_loads_a_layer_of_the_suite(carded_suite):
    text = (carded_suite / CARD_FILE).read_text()
    snippet = python_block(text)
    layer = int(re.search(rf'from_pretrained\("{REPO_ID}", layer=(\d+)', snippet).group(1))
    assert layer in read_suite(carded_suite).layers
    scope: dict = {}
    exec(snippet.replace(REPO_ID, str(carded_suite)), scope)
    assert scope["sae"].layer == layer
    assert scope["x_hat"].shape == scope["x"].shape


def test_card_shows_plot_training_setup_and_metric_table(carded_suite):
    text = (carded_suite / CARD_FILE).read_text()
    assert (carded_suite / PLOT_FILE).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"]({PLOT_FILE})" in text
    run = read_suite(carded_suite).training
    for expected in (
        f"| k | {run['ks'][0]} |",
        f"{run['total_tokens']:,} activations per SAE",
        f"lr {run['lr']:g}",
        f"p ~ U[{run['t_min']:g}, {run['t_max']:g}]",
        "`mask`: activations are kept at the masked positions",
        "`pydoc`, packed into 64-token contexts",
    ):
        assert expected in text
    for layer in read_suite(carded_suite).layers:
        assert re.search(rf"^\| {layer} \| {run['ks'][0]} \| \d\.\d{{3}} \|", text, re.M)
    assert BIBTEX in text
    assert not list(carded_suite.glob(".*.tmp"))


def test_committed_llada_card_parses_and_reports_dlm_scope_numbers():
    path = LLADA_CARD / CARD_FILE
    card = ModelCard.load(path)
    assert (
        metadata_load(path)["model-index"][0]["name"]
        == "AwesomeInterpretability/llada-mask-topk-sae"
    )
    assert card.data.base_model == "GSAI-ML/LLaDA-8B-Base"
    assert REQUIRED_TAGS <= set(card.data.tags)
    reported = json.loads((LLADA_CARD / "reported_metrics.json").read_text())["results"]
    indexed = {(r.metric_config, r.metric_type): r for r in card.data.eval_results}
    assert len(indexed) == len(reported) == 12
    for row in reported:
        result = indexed[f"layer_{row['layer']}/k_{row['k']}", "variance_explained"]
        assert result.metric_value == row["variance_explained"]
        assert result.source_url == "https://openreview.net/forum?id=yO5buOEUag"
    assert indexed["layer_16/k_80", "variance_explained"].metric_value == 0.746
    assert BIBTEX in card.text
    assert "Xu Wang and Bingqing Jiang and Yu Wan and Baosong Yang" in card.text
    assert (
        'from_pretrained("AwesomeInterpretability/llada-mask-topk-sae", layer=16, k=50)'
        in card.text
    )
    assert (LLADA_CARD / PLOT_FILE).read_bytes().startswith(b"\x89PNG")


def test_release_results_outside_the_config_are_refused(tmp_path):
    info = json.loads((LLADA_CARD / "reported_metrics.json").read_text())
    info["results"].append({"layer": 2, "k": 50, "variance_explained": 0.9})
    reported = tmp_path / "reported.json"
    reported.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"\(2, 50\)"):
        release_spec(LLADA_CONFIG, reported)


def test_card_of_a_suite_without_metrics_says_to_evaluate(trained_suite, tmp_path):
    root = tmp_path / "suite"
    shutil.copytree(trained_suite, root)
    (root / "layer_1" / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="hub-sae eval"):
        suite_spec(root)


def test_wheel_ships_the_card_template(tmp_path):
    """`pip install hub-sae` (no checkout) can still render cards: the template is in the wheel."""
    import subprocess
    import sys
    import zipfile

    root, src = Path(__file__).resolve().parent.parent, tmp_path / "src"
    src.mkdir()  # built from a copy: a build leaves build/ and *.egg-info behind
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src)
    for name in ("hub_sae", "model_cards"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("hub_sae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hub_sae/model_cards/template.md" in names
    assert not any("llada-8b-mask" in name for name in names)  # release cards stay in the repo


def test_the_autoregressive_baseline_card_says_so():
    """Qwen2.5-7B's card: no diffusion tag or text, next-token metrics only, no reported numbers."""
    path = ROOT / "model_cards" / "qwen2.5-7b-clean" / CARD_FILE
    card = ModelCard.load(path)
    assert "autoregressive-baseline" in card.data.tags
    assert "diffusion-language-model" not in card.data.tags and not card.data.eval_results
    assert "never trained on masked inputs" in card.text and "`next_token_delta_ce`" in card.text
    assert "dlm_scope_delta_lm_mask" not in card.text and "![FVU per layer]" not in card.text
    dream = ModelCard.load(ROOT / "model_cards" / "dream-7b-mask" / CARD_FILE)
    assert "diffusion-language-model" in dream.data.tags and "next_token_delta_ce" not in dream.text


@pytest.mark.parametrize("repo_id", ["me/../evil", "me/x\nlicense: none", "me/a..b"])
def test_a_repo_id_that_is_no_hub_id_is_refused_before_writing(tmp_path, capsys, repo_id):
    from hub_sae.cli import main

    args = ["card", "--release", str(LLADA_CONFIG), "--repo-id", repo_id]
    args += ["--metrics", str(LLADA_CARD / "reported_metrics.json"), "--out", str(tmp_path / "c")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"the card's repo id {repo_id!r} is not a hub repo id" in err
    assert "give --repo-id owner/name" in err and not (tmp_path / "c").exists()
