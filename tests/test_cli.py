"""The hub-sae command: eval, card, push --dry-run and the refusal of incomplete suites."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hub_sae.cards import CARD_FILE, PLOT_FILE, SUMMARY_FILE
from hub_sae.cli import main
from hub_sae.suite import layer_folders

ROOT = Path(__file__).resolve().parents[1]
LLADA_CARD = ROOT / "model_cards" / "llada-8b-mask"


def hub_sae(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """The real console entry point, offline and without a token (`env`: more variables)."""
    keep = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    keep.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [sys.executable, "-m", "hub_sae.cli", *args],
        capture_output=True,
        text=True,
        env=keep,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture
def suite(trained_suite: Path, tmp_path: Path) -> Path:
    """A private copy of the session's trained suite, safe to modify."""
    root = tmp_path / trained_suite.name
    shutil.copytree(trained_suite, root)
    return root


@pytest.fixture
def carded(suite: Path) -> Path:
    """The copy with its card for me/tiny-mask."""
    assert main(["card", str(suite), "--repo-id", "me/tiny-mask"]) == 0
    return suite


def test_eval_rewrites_metrics_with_the_same_keys(suite, capsys):
    folders = layer_folders(suite)
    before = {key: json.loads((f / "metrics.json").read_text()) for key, f in folders.items()}
    stale = folders[1, 8] / "metrics.json"
    stale.write_text(json.dumps({**before[1, 8], "fvu": -1.0}))

    assert main(["eval", str(suite), "--max-tokens", "256", "--device", "cpu"]) == 0

    summary = json.loads((suite / SUMMARY_FILE).read_text())
    assert summary["eval"]["split"] == "heldout" and summary["eval"]["policy"] == "mask"
    corruption = {"schedule": "dlm_scope", "t_min": 0.05, "t_max": 0.5, "eps": 0.001}
    assert summary["eval"]["corruption"] == corruption
    rows = {(r["layer"], r["k"]): r for r in summary["results"]}
    for key, folder in folders.items():
        after = json.loads((folder / "metrics.json").read_text())
        assert after.keys() == before[key].keys()
        assert 0 < after["fvu"] < 1.5
        assert rows[key]["fvu"] == after["fvu"] and rows[key]["folder"] == f"layer_{key[0]}"
    assert not list(suite.rglob(".*.tmp"))
    table = capsys.readouterr().out
    assert "| layer | k | FVU |" in table and "| 3 | 8 |" in table


def test_eval_of_a_folder_that_is_no_suite_says_so(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--device", "cpu"]) == 1
    assert "not a hub-sae suite" in capsys.readouterr().err


def test_push_dry_run_lists_every_file_with_its_size(carded):
    result = hub_sae("push", str(carded), "--repo-id", "me/tiny-mask", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "would push" in lines[0] and "me/tiny-mask" in lines[0]
    listed = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in lines[1:-1]}
    files = {
        p.relative_to(carded).as_posix(): p.stat().st_size for p in carded.rglob("*") if p.is_file()
    }
    assert listed == files
    assert {CARD_FILE, PLOT_FILE, "suite.json", "layer_1/model.safetensors"} <= set(listed)
    assert lines[-1].startswith(f"total ({len(files)} files)")
    assert f"{sum(files.values()):,}" in lines[-1]


def test_push_refuses_a_suite_missing_weights_naming_the_file(carded):
    (carded / "layer_1" / "model.safetensors").unlink()
    result = hub_sae("push", str(carded), "--repo-id", "me/tiny-mask")
    assert result.returncode == 1
    assert "refusing to push" in result.stderr
    assert str(carded / "layer_1" / "model.safetensors") in result.stderr
    assert "train the suite again" in result.stderr


def test_push_refuses_a_suite_without_card(suite, capsys):
    assert main(["push", str(suite), "--repo-id", "me/tiny-mask", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert str(suite / CARD_FILE) in err and f"hub-sae card {suite}" in err


def test_push_refuses_a_card_made_for_another_repo(carded, capsys):
    assert main(["push", str(carded), "--repo-id", "me/other", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "generated for 'me/tiny-mask'" in err and "--repo-id me/other" in err


RELEASES = (
    "llada-8b-mask",
    "llada-8b-unmask",
    "dream-7b-mask",
    "dream-7b-unmask",
    "qwen2.5-7b-clean",
)
"""model_cards/ folders of the five DLM-Scope repos, each named like its training config."""


@pytest.mark.parametrize("release", RELEASES)
def test_release_card_command_reproduces_the_committed_card(tmp_path, release):
    committed = ROOT / "model_cards" / release
    args = ["card", "--release", str(ROOT / f"training/configs/{release}.yaml")]
    args += ["--metrics", str(committed / "reported_metrics.json"), "--out", str(tmp_path)]
    assert main(args) == 0
    assert (tmp_path / CARD_FILE).read_text() == (committed / CARD_FILE).read_text()
    reported = json.loads((committed / "reported_metrics.json").read_text())["results"]
    assert (tmp_path / PLOT_FILE).is_file() == bool(reported) == (committed / PLOT_FILE).is_file()


def test_every_release_is_listed_with_its_repo_and_command():
    index = (ROOT / "model_cards" / "README.md").read_text()
    for release in RELEASES:
        repo = json.loads((ROOT / "model_cards" / release / "reported_metrics.json").read_text())
        assert f"`{repo['repo_id']}`" in index and f"configs/{release}.yaml" in index


def metrics_bytes(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(root.rglob("metrics.json"))}


def test_eval_never_reads_or_writes_outside_the_suite(suite, tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "metrics.json").write_text("keep me")
    info = json.loads((suite / "suite.json").read_text())
    (suite / "suite.json").write_text(json.dumps({**info, "ks": [8, "16/../../../../victim"]}))
    assert main(["eval", str(suite), "--max-tokens", "256", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert str(suite / "suite.json") in err and "`ks` holds" in err

    (suite / "suite.json").write_text(json.dumps(info))
    shutil.copytree(suite / "layer_1", victim / "layer_1")
    shutil.rmtree(suite / "layer_1")
    (suite / "layer_1").symlink_to(victim / "layer_1")
    before = metrics_bytes(victim)
    assert main(["eval", str(suite), "--max-tokens", "256", "--device", "cpu"]) == 1
    assert "leads out of" in capsys.readouterr().err
    assert metrics_bytes(victim) == before


@pytest.mark.parametrize("value", ["-5", "0", "abc"])
def test_eval_refuses_a_bad_max_tokens_before_writing(suite, capsys, value):
    before = metrics_bytes(suite)
    with pytest.raises(SystemExit) as stop:
        main(["eval", str(suite), "--max-tokens", value, "--device", "cpu"])
    assert stop.value.code == 2 and "--max-tokens" in capsys.readouterr().err
    assert metrics_bytes(suite) == before


def test_eval_writes_no_metrics_unless_every_layer_succeeds(suite, capsys):
    broken = suite / "layer_3" / "metrics.json"
    broken.write_text("{not json")
    before = metrics_bytes(suite)
    assert main(["eval", str(suite), "--max-tokens", "256", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{broken} is not valid JSON" in err and "evaluate again" in err
    assert metrics_bytes(suite) == before


RUN_LOCK = """
import sys
from pathlib import Path
from accelerate import Accelerator
from hub_sae.training import TrainConfig
from hub_sae.training.checkpoint import run_lock

root = Path(sys.argv[1])
with run_lock(TrainConfig(output_dir=str(root.parent), name=root.name), Accelerator(cpu=True)):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_eval_during_a_run_of_the_same_name_stops_and_writes_nothing(suite, capsys):
    trainer = subprocess.Popen(
        [sys.executable, "-c", RUN_LOCK, str(suite)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert trainer.stdout.readline() == "held\n"  # a run of this name holds its lock
    before = metrics_bytes(suite)
    assert main(["eval", str(suite), "--max-tokens", "256", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{suite} is in use: process {trainer.pid}" in err
    assert "A training run or another command is writing it: wait for it to finish" in err
    assert metrics_bytes(suite) == before and not (suite / SUMMARY_FILE).exists()
    trainer.communicate("")


def test_eval_refuses_a_ctx_len_beyond_the_model_naming_both(suite, capsys):
    info = json.loads((suite / "suite.json").read_text())
    info["training"]["ctx_len"] = 4096
    (suite / "suite.json").write_text(json.dumps(info))
    before = metrics_bytes(suite)
    assert main(["eval", str(suite), "--max-tokens", "256", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    said = re.search(r"`training.ctx_len` 4096 exceeds .*'s maximum of (\d+) tokens; set it", err)
    assert said and int(said[1]) < 4096, err
    assert metrics_bytes(suite) == before


def test_eval_max_tokens_is_bounded_by_the_heldout_split(suite, tmp_path):
    corpus = tmp_path / "small.txt"
    words = "the quick brown fox jumps over {} lazy dogs by the river, and then it rests."
    corpus.write_text("\n\n".join(f"Paragraph {i}: " + words.format(i * 7) for i in range(600)))
    args = ("--max-tokens", str(10**12), "--corpus", str(corpus), "--device", "cpu")
    done = hub_sae("eval", str(suite), *args)  # before the bound: years of recycled text
    assert done.returncode == 0, done.stderr
    said = re.search(
        rf"the held-out split \('{re.escape(str(corpus))}', heldout\) has ([\d,]+) tokens in full "
        r"batches of 8 x 64, fewer than --max-tokens 1,000,000,000,000: evaluating \1\.",
        done.stderr,
    )
    assert said, done.stderr
    tokens = int(said[1].replace(",", ""))
    assert tokens > 0 and tokens % (8 * 64) == 0
    summary = json.loads((suite / SUMMARY_FILE).read_text())
    assert summary["eval"]["max_tokens"] == tokens
    assert [r["tokens"] for r in summary["results"]] == [tokens, tokens]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_eval_on_cuda_without_cuda_is_a_clear_error(suite, capsys):
    before = metrics_bytes(suite)
    assert main(["eval", str(suite), "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "--device cuda" in err and "use --device cpu" in err and "Traceback" not in err
    assert main(["eval", str(suite), "--device", "gpu0"]) == 1
    assert "is not a device" in capsys.readouterr().err
    assert metrics_bytes(suite) == before


def test_a_missing_path_is_never_taken_for_a_hub_repo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["eval", "runs/typo", "--device", "cpu"]) == 1
    assert "runs/typo does not exist" in capsys.readouterr().err
    assert main(["card", "c_nolayer"]) == 1
    err = capsys.readouterr().err
    assert "'c_nolayer' is neither an existing local path" in err and "owner/name" in err


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def hub_cache(cache: Path, repo_id: str, suite: Path) -> Path:
    """`suite` as huggingface_hub caches repo_id: blobs, a snapshot of links to them, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    for i, (name, data) in enumerate(sorted(tree_bytes(suite).items())):
        (repo / "blobs" / f"{i:040x}").write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / f"{i:040x}", link.parent))
    return repo


def test_a_repo_id_never_resolves_to_a_local_folder_of_its_name(suite, tmp_path):
    """Offline, `me/tiny-mask` is read from the hub cache only; ./tiny-mask is never touched."""
    assert suite == tmp_path / "tiny-mask"
    before = tree_bytes(suite)
    cache = tmp_path / "cache"
    cache.mkdir()
    for command in ("card", "eval"):
        done = hub_sae(command, "me/tiny-mask", cwd=tmp_path, HF_HUB_CACHE=str(cache))
        assert done.returncode == 1
        assert "me/tiny-mask is a hub repo id" in done.stderr and "--out DIR" in done.stderr
        out = ("--out", str(tmp_path / "copy"))
        done = hub_sae(command, "me/tiny-mask", *out, cwd=tmp_path, HF_HUB_CACHE=str(cache))
        assert done.returncode == 1 and "the hub repo me/tiny-mask could not be read" in done.stderr
    assert tree_bytes(suite) == before and not (tmp_path / "copy").exists()

    repo = hub_cache(cache, "me/tiny-mask", suite)
    cached = tree_bytes(repo)
    done = hub_sae("card", "me/tiny-mask", "--out", "copy", cwd=tmp_path, HF_HUB_CACHE=str(cache))
    assert done.returncode == 0, done.stderr
    copy = tree_bytes(tmp_path / "copy")
    assert {name: copy[name] for name in before} == before  # the cached suite, as files
    assert "me/tiny-mask" in copy[CARD_FILE].decode() and PLOT_FILE in copy
    assert tree_bytes(repo) == cached and tree_bytes(suite) == before
    done = hub_sae("card", "me/tiny-mask", "--out", "copy", cwd=tmp_path, HF_HUB_CACHE=str(cache))
    assert done.returncode == 1 and "copy already exists and is not empty" in done.stderr


def test_every_subpackage_ships_in_the_wheel():
    """pyproject's explicit package list names every folder of hub_sae with an __init__.py."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(root).parts) for p in (root / "hub_sae").rglob("__init__.py")
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
