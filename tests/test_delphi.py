"""`hub-sae export --format delphi`: the shards hold what the suite's SAEs give on the masked text,
and delphi's own LatentDataset builds its records from them."""

from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file

from hub_sae import TopKSAE
from hub_sae.cli import main
from hub_sae.data import token_batches
from hub_sae.delphi import DelphiExport, export_delphi, split_edges
from hub_sae.masking import corrupt
from hub_sae.models import load_base_model
from hub_sae.suite import layer_folders, read_suite

CONTEXTS, N_SPLITS, WINDOW = 10, 3, 16
"""10 contexts: one batch of 8 and 2 rows of the next (a batch cut to fit --max-tokens)."""


@pytest.fixture(scope="module")
def exported(trained_suite: Path, tmp_path_factory) -> Path:
    """The trained suite exported through the command line."""
    out = tmp_path_factory.mktemp("delphi") / "cache"
    ctx_len = read_suite(trained_suite).heldout().ctx_len
    args = ["export", str(trained_suite), "--format", "delphi", "--out", str(out)]
    options = ["--max-tokens", str(CONTEXTS * ctx_len + 5), "--n-splits", str(N_SPLITS)]
    assert main([*args, *options, "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
@torch.no_grad()
def expected(trained_suite: Path):
    """Recomputed without the export's code: the held-out contexts, masked with a generator of
    seed 0 batch by batch, one full forward each (all hidden states), every SAE encoded densely
    and kept at the masked positions. Returns (base, clean ids, masked, ratios, {layer: latents})."""
    info = read_suite(trained_suite)
    base = load_base_model(info.base_model)
    data = info.heldout()
    generator = torch.Generator().manual_seed(0)
    saes = {
        layer: TopKSAE.from_pretrained(f) for (layer, _), f in layer_folders(trained_suite).items()
    }
    clean, masked, ratios, dense = [], [], [], {layer: [] for layer in saes}
    for input_ids, attention_mask in token_batches(
        data, base.tokenizer, base.bos_token_id, base.eos_token_id
    ):
        batch = corrupt(
            input_ids, attention_mask, base.mask_token_id, "mask", info.corruption, generator
        )
        hidden = base.model(batch.input_ids, attention_mask, output_hidden_states=True)
        for layer, sae in saes.items():
            enc = sae.encode(hidden.hidden_states[layer + 1])
            latents = torch.zeros(*input_ids.shape, sae.d_sae).scatter(
                -1, enc.top_indices, enc.top_acts
            )
            keep = batch.is_masked.clone()
            keep[:, 0] = False
            dense[layer].append(latents * keep[..., None])
        clean.append(input_ids)
        masked.append(batch.is_masked)
        ratios.append(batch.p)
        if sum(map(len, clean)) >= CONTEXTS:
            break
    cut = {layer: torch.cat(d)[:CONTEXTS] for layer, d in dense.items()}
    return (
        base,
        torch.cat(clean)[:CONTEXTS],
        torch.cat(masked)[:CONTEXTS],
        torch.cat(ratios)[:CONTEXTS],
        cut,
    )


def test_each_shard_holds_the_latents_of_the_masked_positions_and_the_clean_text(
    exported, expected
):
    base, clean, masked, ratios, dense = expected
    assert sorted(p.name for p in exported.iterdir()) == ["layers.1", "layers.3"]
    for layer, latents in dense.items():
        folder = exported / f"layers.{layer}"
        edges = split_edges(latents.shape[-1], N_SPLITS)
        assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(
            f"{start}_{end}.safetensors" for start, end in edges
        )
        assert edges[0][0] == 0 and edges[-1][1] == latents.shape[-1] - 1
        for start, end in edges:
            shard = load_file(str(folder / f"{start}_{end}.safetensors"))
            assert (shard["tokens"] == clean.numpy()).all() and base.mask_token_id not in clean
            assert (shard["masked"] == masked.numpy()).all() and not shard["masked"][:, 0].any()
            torch.testing.assert_close(torch.from_numpy(shard["mask_ratio"]), ratios)
            part = latents[..., start : end + 1]
            locations = (part > 0).nonzero()  # delphi's order: context, position, latent
            assert shard["locations"].dtype.name == "uint16"
            assert (shard["locations"] == locations.numpy()).all()
            assert shard["activations"].dtype.name == "float16"
            torch.testing.assert_close(
                torch.from_numpy(shard["activations"]), part[part > 0].half(), rtol=1e-3, atol=1e-3
            )
            # every recorded position was masked in the model's input
            assert shard["masked"][shard["locations"][:, 0], shard["locations"][:, 1]].all()


def test_delphi_builds_its_records_from_the_export(exported, expected):
    pytest.importorskip("delphi")
    from delphi.config import ConstructorConfig, SamplerConfig
    from delphi.latents import LatentDataset

    base, clean, _, _, dense = expected
    sampler = SamplerConfig(n_examples_train=4, n_examples_test=4, n_quantiles=2)
    constructor = ConstructorConfig(example_ctx_len=WINDOW, min_examples=1, n_non_activating=2)
    dataset = LatentDataset(exported, sampler, constructor, tokenizer=base.tokenizer)
    records = {(r.latent.module_name, r.latent.latent_index): r for r in dataset}
    windows = clean.reshape(-1, WINDOW)
    want = {
        (f"layers.{layer}", j)
        for layer, latents in dense.items()
        for j in (latents > 0).flatten(0, 1).any(0).nonzero().flatten().tolist()
    }
    assert set(records) == want
    for (module, j), record in records.items():
        latent = dense[int(module.split(".")[1])][..., j]
        assert record.per_token_frequency == (latent > 0).sum().item() / clean.numel()
        acts = latent.half().reshape(-1, WINDOW)
        fired = acts.amax(1) > 0
        # delphi's examples: each window of WINDOW tokens where the latent fires, by peak value
        examples = sorted(
            (-float(e.activations.max()), e.tokens.tolist(), e.activations.tolist())
            for e in record.examples
        )
        assert examples == sorted(
            (-float(a.max()), t.tolist(), a.tolist())
            for t, a in zip(windows[fired], acts[fired], strict=True)
        )
        # the sampler draws its train examples from them
        assert len(record.train) <= sampler.n_examples_train
        assert all(any(t.tokens.equal(e.tokens) for e in record.examples) for t in record.train)


@pytest.mark.parametrize(
    "options, message",
    [
        (DelphiExport(n_splits=0), "--n-splits must be a whole number from 1 to d_sae"),
        (DelphiExport(n_splits=10_000), "from 1 to d_sae"),
        (DelphiExport(max_tokens=63), "at least one context"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(
    trained_suite, tmp_path, options, message
):
    with pytest.raises(ValueError, match=message):
        export_delphi(trained_suite, tmp_path / "out", options=options)
    assert not (tmp_path / "out").exists()


def test_the_command_refuses_what_the_export_cannot_use(trained_suite, tmp_path, capsys):
    args = ["export", str(trained_suite), "--out", str(tmp_path / "out")]
    assert main([*args, "--format", "delphi", "--layer", "2"]) == 1
    assert "no SAE for layer 2" in capsys.readouterr().err
    assert main([*args, "--format", "sparsify", "--n-splits", "2"]) == 1
    assert "--n-splits only apply to --format delphi" in capsys.readouterr().err
    (tmp_path / "sae").mkdir()
    assert (
        main(["export", str(tmp_path / "sae"), "--format", "delphi", "--out", str(tmp_path / "x")])
        == 1
    )
    assert "not a local hub-sae suite" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
