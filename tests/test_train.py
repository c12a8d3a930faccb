"""The real trainer on the embedded default: suite contents, DDP on 2 CPU processes, SIGKILL + resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub_sae import TopKSAE
from hub_sae.features import load_features
from hub_sae.suite import validate_suite
from tests.conftest import TINY_RUN
from training.train import parse_args
from training.trainer import ActivationStream, TrainConfig, geometric_median, lr_lambda

ROOT = Path(__file__).resolve().parent.parent


def cli_args(out: Path, **overrides) -> list[str]:
    """TINY_RUN (+ overrides) as `--key value` arguments of training/train.py."""
    cfg = {**TINY_RUN, "output_dir": str(out), **overrides}
    return [item for key, value in cfg.items() for item in (f"--{key}", json.dumps(value))]


def launch(out: Path, *extra: str, processes: int = 1, **overrides) -> subprocess.Popen:
    """`accelerate launch training/train.py` in its own process group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
        flags = ["--multi_gpu", "--num_processes", str(processes)]
    else:
        flags = ["--cpu", "--num_processes", "1"]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *flags,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "training" / "train.py"),
        *cli_args(out, **overrides),
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_suite_is_complete_and_loads(trained_suite: Path) -> None:
    suite = json.loads((trained_suite / "suite.json").read_text())
    assert suite["layers"] == TINY_RUN["layers"] and suite["policy"] == "mask"
    assert validate_suite(trained_suite, require_card=False) == []
    for layer in TINY_RUN["layers"]:
        sae = TopKSAE.from_pretrained(trained_suite, layer=layer)
        assert (sae.layer, sae.k, sae.d_in, sae.d_sae) == (layer, 8, 384, 768)
        norms = sae.W_dec.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
        metrics = json.loads((trained_suite / f"layer_{layer}" / "metrics.json").read_text())
        assert 0 < metrics["fvu"] < 1 and metrics["l0"] <= 8
        features = load_features(trained_suite / f"layer_{layer}" / "features.safetensors")
        assert features.frequency.shape == (768,) and features.tokens > 0
        fired = features.frequency > 0
        assert (features.top_values[fired, 0] > 0).all() and (
            features.top_tokens[~fired] == -1
        ).all()
        centre = features.top_contexts[fired, 0, features.window]
        assert (centre == 103).all()  # mask policy: every example is a [MASK] position


def test_saved_weights_take_raw_activations(trained_suite: Path) -> None:
    """The input scale is folded in: the saved SAE reconstructs unscaled activations."""
    from hub_sae.activations import harvest
    from hub_sae.data import DataConfig, token_batches
    from hub_sae.models.hf import load_hf

    base = load_hf("minilm")
    data = DataConfig(split="heldout", ctx_len=64)
    ids, mask = next(token_batches(data, base.tokenizer, base.bos_token_id, base.eos_token_id))
    h = harvest(base, ids, mask, [3], generator=torch.Generator().manual_seed(0))
    sae = TopKSAE.from_pretrained(trained_suite, layer=3)
    out = sae(h.acts[3])
    assert out.fvu < 0.9


def test_stream_harvests_only_what_is_still_drawn() -> None:
    """A big shuffle buffer is not filled for the last few SAE batches of a run."""
    from hub_sae.models import load_base_model

    cfg = TrainConfig(**{**TINY_RUN, "buffer_tokens": 8192, "sae_batch_size": 64})
    base = load_base_model(cfg.model)
    drawn = []
    for limit in (None, 3):
        stream = ActivationStream(base, cfg, rank=0, world=1)
        stream.remaining = limit
        batches = iter(stream)
        shapes = [next(batches).shape for _ in range(3)]
        assert shapes == [(64, len(cfg.layers), base.d_model)] * 3
        drawn.append(stream.batches_read)
    # 8k activations take ~60 LLM batches; 2 x 3 x 64 (a fill is twice what is drawn) take one or two
    assert 1 <= drawn[1] and drawn[1] * 10 < drawn[0], drawn


def test_geometric_median_resists_outliers() -> None:
    points = torch.cat([torch.randn(99, 4) * 0.01, torch.full((1, 4), 1000.0)])
    assert geometric_median(points).abs().max() < 0.1
    assert points.mean(0).abs().max() > 9


def test_lr_schedule_warms_up_and_decays() -> None:
    f = lr_lambda(TrainConfig(warmup_steps=10, decay_fraction=0.2), total_steps=100)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(50) == 1.0
    assert f(80) == 1.0 and f(90) == pytest.approx(0.5) and f(100) == 0.0


def test_cli_overrides_are_parsed_as_yaml() -> None:
    cfg, resume = parse_args(["--layers", "[1, 2]", "--lr", "3e-4", "--resume"])
    assert cfg.layers == [1, 2] and cfg.lr == 3e-4 and resume
    assert cfg.name == "minilm-mask"  # the rest comes from the default config


def test_unknown_config_key_names_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("layer: 3\n")
    with pytest.raises(ValueError, match="unknown config keys \\['layer'\\].*layers"):
        TrainConfig.from_yaml(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"layers": [1, 9]}, r"block indices in 0\.\.5 .*got \[1, 9\]"),
        ({"ks": [768]}, "0 < k < d_sae=768"),
        ({"corpus": "no/such/corpus.txt"}, "corpus 'no/such/corpus.txt' does not exist"),
        ({"policy": "masked"}, "unknown mask policy 'masked'"),
    ],
)
def test_config_errors_stop_before_any_output(tmp_path: Path, override: dict, message: str) -> None:
    from training.trainer import train

    out = tmp_path / "runs"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(TrainConfig(output_dir=str(out), **{**TINY_RUN, **override}))
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    log = finish(launch(out, processes=2))
    suite = json.loads((out / TINY_RUN["name"] / "suite.json").read_text())
    training = suite["training"]
    assert training["processes"] == 2, log[-2000:]
    first, second = training["rank_checksums"]
    assert first == second
    assert training["tokens"] >= TINY_RUN["total_tokens"] - 2 * TINY_RUN["sae_batch_size"]


@pytest.mark.slow
def test_sigkill_then_resume_completes_the_suite(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    run = dict(total_tokens=16384, checkpoint_every=4, feature_tokens=512)
    proc = launch(out, **run)
    checkpoints = out / "checkpoints" / TINY_RUN["name"]
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("step_*")):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / TINY_RUN["name"]).exists()
    for step in checkpoints.glob("step_*"):  # whatever is visible is whole
        assert {p.name for p in step.iterdir()} == {"trainer.pt", "rank_0.pt"}
        state = torch.load(step / "trainer.pt", weights_only=True)
        assert state["state"]["step"] == int(step.name.removeprefix("step_"))

    log = finish(launch(out, "--resume", **run))
    assert "resumed from" in log
    suite_dir = out / TINY_RUN["name"]
    assert validate_suite(suite_dir, require_card=False) == []
    suite = json.loads((suite_dir / "suite.json").read_text())
    assert suite["training"]["steps"] == 16384 // TINY_RUN["sae_batch_size"]
    for layer in TINY_RUN["layers"]:
        weights = load_file(suite_dir / f"layer_{layer}" / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
    assert not checkpoints.exists()  # cleaned up once the suite is written
