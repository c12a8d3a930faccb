"""Two gloo processes through the real launcher: modules == replicate, SIGKILL + resume == uninterrupted."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub_sae.suite import validate_suite
from hub_sae.training import TrainConfig, parse_args, train
from hub_sae.training.plan import plan
from tests.conftest import TINY_RUN, cli_args, finish, launch, wait_gone, workers

RUN = dict(total_tokens=8192, checkpoint_every=2, eval_tokens=512, feature_tokens=512)
"""16 steps of 2 x 256 activations, a checkpoint every 2."""

pytestmark = pytest.mark.slow


def weights(suite: Path) -> dict[str, torch.Tensor]:
    return {
        f"{layer}/{name}": tensor
        for layer in TINY_RUN["layers"]
        for name, tensor in load_file(suite / f"layer_{layer}" / "model.safetensors").items()
    }


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def modules_suite(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("modules")
    finish(launch(out, processes=2, **RUN))
    return out / TINY_RUN["name"]


def test_modules_and_replicate_train_the_same_saes(modules_suite: Path, tmp_path: Path) -> None:
    finish(launch(tmp_path, processes=2, distribute="replicate", **RUN))
    replicate_suite = tmp_path / TINY_RUN["name"]
    assert_same_weights(modules_suite, replicate_suite)

    cfg = TrainConfig(**{**TINY_RUN, **RUN})
    planned = plan(cfg, 2)["modes"]
    for suite, mode, held in [
        (modules_suite, "modules", [["layer_1_k8"], ["layer_3_k8"]]),
        (replicate_suite, "replicate", [["layer_1_k8", "layer_3_k8"]] * 2),
    ]:
        training = json.loads((suite / "suite.json").read_text())["training"]
        assert (training["processes"], training["distribute"]) == (2, mode)
        assert training["steps"] == 16 and training["tokens"] == 8192
        processes = training["held_by_process"]
        assert [p["saes"] for p in processes] == held  # each process holds only its own SAEs
        for p in processes:  # and as many bytes as planned
            assert p["weight_bytes"] == planned[mode]["sae_weights"]
            assert p["adam_bytes"] == planned[mode]["adam_state"]


def test_sigkill_during_modules_run_then_resume_equals_uninterrupted(
    modules_suite: Path, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    proc = launch(out, processes=2, **RUN)
    checkpoints = out / "checkpoints" / TINY_RUN["name"]
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("step_*")):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    children = workers(proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_gone(children)  # torchrun starts its workers in their own sessions: they see it go
    assert not (out / TINY_RUN["name"]).exists()
    for step in checkpoints.glob("step_*"):  # whatever is visible is whole
        assert {p.name for p in step.iterdir()} == {"trainer.pt", "rank_0.pt", "rank_1.pt"}
        state = torch.load(step / "trainer.pt", weights_only=True)
        assert state["state"]["step"] == int(step.name.removeprefix("step_"))
        assert (state["processes"], state["distribute"]) == (2, "modules")

    cfg, _ = parse_args(cli_args(out, **RUN))  # the launch's config, on one process: refused
    with pytest.raises(ValueError, match="written by 2 process.*--num_processes 2"):
        train(cfg, resume=True)

    log = finish(launch(out, "--resume", processes=2, **RUN))
    assert "resumed from" in log
    suite = out / TINY_RUN["name"]
    assert validate_suite(suite, require_card=False) == []
    assert json.loads((suite / "suite.json").read_text())["training"]["steps"] == 16
    assert not checkpoints.exists()  # cleaned up once the suite is written
    assert_same_weights(suite, modules_suite)  # the shuffle buffer was saved: no resume gap
