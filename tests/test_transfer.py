"""Transfer: `hub-sae eval SUITE --base-model OTHER --out DIR` measures a suite on another
checkpoint of the same width, writing only into DIR."""

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
)

from hub_sae.cli import main
from hub_sae.evaluate import SUMMARY_FILE, evaluate_suite
from hub_sae.models import load_base_model
from hub_sae.models.hf import default_model_path
from hub_sae.sae import TopKSAE
from hub_sae.suite import layer_folders, read_suite
from tests.test_evaluate import assert_shared_runs_change_nothing


@pytest.fixture(scope="module")
def tuned_minilm(tmp_path_factory) -> Path:
    """A fine-tune stand-in: the embedded MiniLM with every weight moved by 2 % of its tensor's
    standard deviation (seeded noise), saved by transformers with its tokenizer."""
    folder = tmp_path_factory.mktemp("minilm-tuned")
    model = AutoModel.from_pretrained(default_model_path())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * param.std() * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def narrow_bert(tmp_path_factory) -> Path:
    """A random BERT of width 32 with MiniLM's tokenizer."""
    folder = tmp_path_factory.mktemp("bert-32")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def files(root: Path) -> dict[Path, tuple[bytes, int]]:
    """Every file under `root` with its bytes and modification time (ns)."""
    return {
        p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_transfer_measures_the_other_model_and_writes_only_into_out(
    trained_suite, tuned_minilm, tmp_path, capsys
):
    before = files(trained_suite)
    out = tmp_path / "on-tuned"
    args = ["eval", str(trained_suite), "--base-model", str(tuned_minilm), "--out", str(out)]
    assert main([*args, "--max-tokens", "256", "--device", "cpu"]) == 0
    assert files(trained_suite) == before  # bytes and mtimes: the suite is untouched
    assert "| 3 | 8 |" in capsys.readouterr().out

    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["eval"]["base_model"] == str(tuned_minilm)
    info = read_suite(out)
    assert info == read_suite(trained_suite)  # the copy still names the model it was trained on
    saes = {key: TopKSAE.from_pretrained(f).eval() for key, f in layer_folders(out).items()}
    tuned = load_base_model(str(tuned_minilm))
    expected = evaluate_suite(
        tuned, saes, info.policy, info.corruption, info.heldout(), 256, progress=False
    )
    for key, folder in layer_folders(out).items():
        written = json.loads((folder / "metrics.json").read_text())
        assert written["fvu"] == expected[key]["fvu"]
        # a head-less model's metric: not the embedded default, which gets its unmasking head
        assert written["output_recovered"] == expected[key]["output_recovered"]


def test_transfer_shares_runs_without_an_lm_head_too(trained_suite, tuned_minilm):
    """The head-less model takes the cosine / relative MSE path of the shared runs."""
    base = load_base_model(str(tuned_minilm))
    assert not base.has_lm_head
    saes = {
        key: TopKSAE.from_pretrained(f).eval() for key, f in layer_folders(trained_suite).items()
    }
    assert_shared_runs_change_nothing(base, saes)


def test_transfer_refuses_another_width_naming_both(trained_suite, narrow_bert, tmp_path, capsys):
    before = files(trained_suite)
    out = tmp_path / "narrow"
    args = ["eval", str(trained_suite), "--base-model", str(narrow_bert), "--out", str(out)]
    assert main([*args, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{narrow_bert} has width 32" in err and "read activations of width 384" in err
    assert "evaluate them on a checkpoint of width 384" in err
    assert files(trained_suite) == before and not out.exists()  # refused before the copy


def test_transfer_refuses_a_model_that_cannot_run_the_policy(trained_suite, tmp_path, capsys):
    causal = tmp_path / "gpt2-384"
    config = GPT2Config(vocab_size=512, n_positions=128, n_embd=384, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(causal)
    out = tmp_path / "causal"
    args = ["eval", str(trained_suite), "--base-model", str(causal), "--out", str(out)]
    assert main([*args, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "mask policy 'mask'" in err and "family ar" in err
    assert not out.exists()


def test_base_model_needs_out(trained_suite, tuned_minilm, capsys):
    before = files(trained_suite)
    assert main(["eval", str(trained_suite), "--base-model", str(tuned_minilm)]) == 1
    err = capsys.readouterr().err
    assert "--base-model" in err and "with --out DIR" in err
    assert files(trained_suite) == before
