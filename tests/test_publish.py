"""What `hub-sae push` uploads: regular files of a loadable suite only, and the deletions it commits."""

from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete

from hub_sae.cards import CARD_FILE, PLOT_FILE
from hub_sae.cli import main
from hub_sae.publish import commit_operations, suite_files
from tests.test_export import random_suite

REPO = "me/tiny"


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    """A complete suite with its card and plot, ready to push."""
    root = tmp_path / "suite"
    random_suite(root, ks=(4,))
    (root / CARD_FILE).write_text("A card.\n")
    (root / PLOT_FILE).write_bytes(b"png")
    return root


def dry_run(suite: Path, capsys) -> tuple[int, str, str]:
    code = main(["push", str(suite), "--repo-id", REPO, "--dry-run"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_complete_suite_passes_the_dry_run(suite, capsys):
    code, out, err = dry_run(suite, capsys)
    assert code == 0 and "would push" in out and err == ""


def test_a_link_to_a_file_outside_the_suite_is_refused(suite, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    (suite / "notes.txt").symlink_to(secret)
    code, _, err = dry_run(suite, capsys)
    assert code == 1
    assert f"{suite / 'notes.txt'} is a symbolic link (to {secret})" in err


def test_a_layer_folder_that_is_a_link_is_an_error_not_skipped(suite, tmp_path, capsys):
    (suite / "layer_3").rename(tmp_path / "elsewhere")
    (suite / "layer_3").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    code, _, err = dry_run(suite, capsys)
    assert code == 1 and f"{suite / 'layer_3'} is a symbolic link" in err
    assert all(not f.path_in_repo.startswith("layer_3") for f in suite_files(suite))


@pytest.mark.parametrize("content", [b"", b"\x00" * 64])
def test_an_empty_or_corrupt_weight_file_fails_the_dry_run(suite, capsys, content):
    (suite / "layer_1" / "model.safetensors").write_bytes(content)
    code, _, err = dry_run(suite, capsys)
    assert code == 1 and f"Could not read {suite / 'layer_1' / 'model.safetensors'}" in err


def test_non_finite_weights_fail_the_dry_run(suite, capsys):
    from hub_sae import TopKSAE

    sae = TopKSAE.from_pretrained(suite / "layer_3")
    with torch.no_grad():
        sae.b_dec[0] = float("nan")
    sae.save_pretrained(suite / "layer_3")
    code, _, err = dry_run(suite, capsys)
    assert code == 1 and "tensor b_dec holds NaN or Inf" in err


def test_a_file_beyond_the_suite_layout_is_refused_unless_included(suite, capsys):
    (suite / "hf_token.txt").write_text("hf_secret")
    (suite / "layer_1" / "notes.txt").write_text("notes 123")
    code, out, err = dry_run(suite, capsys)
    assert code == 1 and "would push" not in out
    for path in ("hf_token.txt", "layer_1/notes.txt"):
        assert f"{suite / path} (9 B) is not part of the suite layout" in err.replace(
            "(5 B)", "(9 B)"
        )
        assert f"move it out of the folder, or upload it with --include {path}" in err

    args = ["push", str(suite), "--repo-id", REPO, "--dry-run", "--include", "layer_*/*.txt"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "hf_token.txt" in err and "notes.txt" not in err
    assert main([*args, "--include", "hf_token.txt"]) == 0
    captured = capsys.readouterr()
    listed = [line.split()[0] for line in captured.out.splitlines()[1:-1]]
    assert "hf_token.txt" in listed and "layer_1/notes.txt" in listed
    assert "named by --include: hf_token.txt, layer_1/notes.txt" in captured.err


def test_the_commit_deletes_what_the_suite_no_longer_has(suite):
    files = suite_files(suite)
    repo = [".gitattributes", "suite.json", "layer_1/model.safetensors", "layer_5/config.json"]
    operations = commit_operations(files, repo)
    added = [op.path_in_repo for op in operations if isinstance(op, CommitOperationAdd)]
    deleted = [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)]
    assert added == [f.path_in_repo for f in files]
    assert deleted == ["layer_5/config.json"]
