"""Export to SAELens and sparsify: the libraries load our folders with the same reconstruction."""

import json
from pathlib import Path

import pytest
import torch

from hub_sae import TopKSAE
from hub_sae.cli import main
from hub_sae.export import export
from hub_sae.io import UnsafePathError
from hub_sae.suite import SuiteInfo, save_suite
from tests.test_formats import (
    D_IN,
    D_SAE,
    assert_same_reconstruction,
    randomize,
    saelens_reference,
    sparsify_reference,
)
from tests.test_io import hold_lock

LAYERS, KS = (1, 3), (4, 6)


def random_suite(root: Path, ks=KS) -> dict[tuple[int, int], TopKSAE]:
    """A suite of SAEs with random weights in every tensor (b_dec and biases included)."""
    saes = {}
    for i, (layer, k) in enumerate((layer, k) for layer in LAYERS for k in ks):
        saes[layer, k] = TopKSAE(
            D_IN, D_SAE, k, layer=layer, base_model="some/model", policy="unmask"
        )
        randomize(saes[layer, k], seed=i)
    info = SuiteInfo("some/model", "unmask", list(LAYERS), list(ks), D_IN, D_SAE)
    save_suite(root, saes, {key: {} for key in saes}, info)
    return saes


def test_suite_exports_one_folder_per_layer_and_k_that_hub_sae_reads_back(tmp_path):
    saes = random_suite(tmp_path / "suite")
    saelens = export(tmp_path / "suite", "saelens", tmp_path / "saelens")
    sparsify = export(tmp_path / "suite", "sparsify", tmp_path / "sparsify")
    assert sorted(p.relative_to(tmp_path / "saelens").as_posix() for p in saelens) == [
        f"k_{k}/blocks.{layer}.hook_resid_post" for k in KS for layer in LAYERS
    ]
    assert sorted(p.relative_to(tmp_path / "sparsify").as_posix() for p in sparsify) == [
        f"k_{k}/layers.{layer}" for k in KS for layer in LAYERS
    ]
    run = json.loads((tmp_path / "sparsify" / "k_4" / "config.json").read_text())
    assert run["model"] == "some/model" and run["hookpoints"] == ["layers.1", "layers.3"]
    x = torch.randn(32, D_IN)
    for folder in [*saelens, *sparsify]:
        back = TopKSAE.from_pretrained(folder)
        original = saes[back.layer, back.k]
        assert (back.base_model, back.hookpoint) == ("some/model", "resid_post")
        torch.testing.assert_close(back(x).reconstruction, original(x).reconstruction)
    assert TopKSAE.from_pretrained(saelens[0]).policy == "unmask"
    assert not list(tmp_path.glob(".*.tmp"))


def test_saelens_loads_the_export_with_the_same_reconstruction(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    saes = random_suite(tmp_path / "suite", ks=(5,))
    for folder in export(tmp_path / "suite", "saelens", tmp_path / "out"):
        theirs = sae_lens.SAE.load_from_disk(folder)
        layer = int(folder.name.split(".")[1])
        assert (theirs.cfg.metadata.model_name, theirs.cfg.metadata.hook_name) == (
            "some/model",
            f"blocks.{layer}.hook_resid_post",
        )
        x = torch.randn(64, D_IN) * 2
        assert_same_reconstruction(saes[layer, 5], saelens_reference(theirs), x)


def test_sparsify_loads_the_export_with_the_same_reconstruction(tmp_path):
    pytest.importorskip("sparsify")
    from sparsify import SparseCoder

    saes = random_suite(tmp_path / "suite", ks=(5,))
    export(tmp_path / "suite", "sparsify", tmp_path / "out")
    coders = SparseCoder.load_many(str(tmp_path / "out"), local=True)
    assert sorted(coders) == ["layers.1", "layers.3"]
    for layer in LAYERS:
        x = torch.randn(64, D_IN)
        assert_same_reconstruction(saes[layer, 5], sparsify_reference(coders[f"layers.{layer}"]), x)


def test_export_command_picks_one_sae_and_refuses_a_full_folder(tmp_path, capsys):
    random_suite(tmp_path / "suite")
    args = ["export", str(tmp_path / "suite"), "--format", "sparsify", "--out"]
    assert main([*args, str(tmp_path / "one"), "--layer", "3", "--k", "6"]) == 0
    assert "wrote 1 sparsify folder" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "layers.3"]
    assert TopKSAE.from_pretrained(tmp_path / "one").k == 6
    assert main([*args, str(tmp_path / "one")]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_a_hookpoint_read_from_a_file_never_writes_outside_the_export(tmp_path, fmt):
    TopKSAE(D_IN, D_SAE, 4, layer=1, hookpoint="../../escaped").save_pretrained(tmp_path / "sae")
    with pytest.raises(UnsafePathError, match="escaped"):
        export(tmp_path / "sae", fmt, tmp_path / "a" / "out")
    assert not (tmp_path / "escaped").exists() and list((tmp_path / "a").iterdir()) == []


def test_export_stops_at_once_while_another_process_writes_its_folder(tmp_path, capsys):
    random_suite(tmp_path / "suite", ks=(4,))
    out = tmp_path / "out"
    holder = hold_lock(out)
    args = ["export", str(tmp_path / "suite"), "--format", "saelens", "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{out} is in use: process {holder.pid}" in err and "write elsewhere" in err
    assert not out.exists()
    holder.communicate("")
    assert main(args) == 0 and len(list(out.iterdir())) == 2


def test_export_to_the_current_folder_is_refused_and_keeps_it(tmp_path, monkeypatch, capsys):
    random_suite(tmp_path / "suite", ks=(4,))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["export", str(tmp_path / "suite"), "--format", "saelens", "--out", "."]) == 1
    err = capsys.readouterr().err
    assert "refusing to write .: it is the current folder" in err and "e.g. ./out" in err
    assert here.is_dir() and list(here.iterdir()) == []


def test_export_through_a_symlinked_out_fills_its_target_and_keeps_the_link(tmp_path):
    random_suite(tmp_path / "suite", ks=(4,))
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real", target_is_directory=True)
    folders = export(tmp_path / "suite", "sparsify", tmp_path / "out")
    assert (tmp_path / "out").readlink() == tmp_path / "real"
    assert TopKSAE.from_pretrained(folders[0]).k == 4
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == [
        "config.json",
        "layers.1",
        "layers.3",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real", "suite"]
