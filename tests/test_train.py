"""The real trainer on the embedded default, in one process: suite contents, config and CLI checks,
the stream's resumable state, the schedule, the plan, divergence, the run lock and the launcher."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hub_sae import TopKSAE
from hub_sae.features import load_features
from hub_sae.models import load_base_model
from hub_sae.suite import validate_suite
from hub_sae.training import TrainConfig, parse_args, train
from hub_sae.training.checkpoint import checkpoint_root, checkpoints
from hub_sae.training.loop import checkpoint, lr_schedule, setup, start, train_step
from hub_sae.training.plan import base_forward, check_fits, model_shape, plan, plan_mode
from hub_sae.training.saes import SAESet, geometric_median, owners
from hub_sae.training.stream import EMPTY_BATCHES, ActivationStream
from tests.conftest import PEAK_RSS, ROOT, TINY_RUN, finish, launch, wait_gone, workers


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
        assert (
            features.top_contexts[fired, 0, features.window] == features.top_tokens[fired, 0]
        ).all()
        # mask policy: every example is a masked position, shown by its clean token
        assert features.example_masked[fired, 0, 0, features.window].all()


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


@pytest.fixture(scope="module")
def minilm():
    return load_base_model("minilm")


def test_stream_harvests_only_what_is_still_drawn(minilm) -> None:
    """A big shuffle buffer is not filled for the last few SAE batches of a run."""
    cfg = TrainConfig(**{**TINY_RUN, "buffer_tokens": 8192, "sae_batch_size": 64})
    drawn = []
    for draws in (None, 3):
        stream = ActivationStream(minilm, cfg, rank=0, world=1, draws=draws)
        batches = iter(stream)
        shapes = [next(batches).shape for _ in range(3)]
        assert shapes == [(64, len(cfg.layers), minilm.d_model)] * 3
        drawn.append(stream.batches_read)
    # 8k activations take ~60 LLM batches; 2 x 3 x 64 (a fill is twice what is drawn) take one or two
    assert 1 <= drawn[1] and drawn[1] * 10 < drawn[0], drawn


@pytest.mark.parametrize("reuse", [1, 2])
def test_stream_state_resumes_the_exact_batches(minilm, reuse: int) -> None:
    """Saved mid-way (buffer half drawn), a new stream continues with the very same batches."""
    cfg = TrainConfig(**{**TINY_RUN, "sae_batch_size": 128, "reuse_activations": reuse})
    stream = ActivationStream(minilm, cfg, rank=0, world=1, draws=20)
    batches = iter(stream)
    for _ in range(5):  # 1024-row buffer, 512 drawn per fill: the 5th batch is from the 2nd fill
        next(batches)
    state = stream.state_dict()
    expected = [next(batches) for _ in range(10)]
    resumed = ActivationStream(minilm, cfg, rank=0, world=1, draws=20)
    resumed.load_state_dict(state)
    again = iter(resumed)
    for batch in expected:
        torch.testing.assert_close(next(again), batch, rtol=0, atol=0)


def test_stream_stops_when_no_position_is_selected(minilm) -> None:
    """t_max 1e-30 passes the config check but masks nothing: the stream names it, never hangs."""
    run = {**TINY_RUN, "ctx_len": 8, "llm_batch_size": 1, "t_min": 0.0, "t_max": 1e-30}
    stream = ActivationStream(minilm, TrainConfig(**run), rank=0, world=1)
    with pytest.raises(RuntimeError, match="100 LLM batches in a row .* gave no activation"):
        next(iter(stream))
    assert stream.batches_read == EMPTY_BATCHES


def test_reuse_activations_replays_kept_ones(minilm) -> None:
    """reuse 2 harvests half the activations and replays them, each row seen about twice."""
    read, rows = {}, {}
    for reuse in (1, 2):
        cfg = TrainConfig(**{**TINY_RUN, "sae_batch_size": 128, "reuse_activations": reuse})
        stream = ActivationStream(minilm, cfg, rank=0, world=1, draws=24)
        batches = iter(stream)
        rows[reuse] = torch.cat([next(batches)[:, 0] for _ in range(24)])
        read[reuse] = stream.batches_read
    assert read[2] <= read[1] * 0.6, read
    assert torch.unique(rows[2], dim=0).shape[0] <= 0.6 * len(rows[2])
    assert torch.unique(rows[1], dim=0).shape[0] == len(rows[1])


def test_geometric_median_resists_outliers() -> None:
    points = torch.cat([torch.randn(99, 4) * 0.01, torch.full((1, 4), 1000.0)])
    assert geometric_median(points).abs().max() < 0.1
    assert points.mean(0).abs().max() > 9


def test_lr_schedule_is_dictionary_learnings() -> None:
    """transformers' WSD schedule gives DLM-Scope's (dictionary_learning's) factor at every step:
    step / warmup, then 1, then (total - step) / (total - decay_start)."""
    cfg = TrainConfig(warmup_steps=10, decay_fraction=0.2, lr=1.0)
    total, decay_start = 100, 80
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = lr_schedule(optimizer, cfg, total)
    for step in range(total):
        lr = scheduler.get_last_lr()[0]
        if step < 10:
            expected = step / 10
        elif step < decay_start:
            expected = 1.0
        else:
            expected = (total - step) / (total - decay_start)
        assert lr == pytest.approx(expected), step
        optimizer.step()
        scheduler.step()
        if step in (3, 50, 90):  # a resumed run's schedule, placed at the step, is the same
            placed = lr_schedule(torch.optim.SGD([torch.zeros(1)], lr=1.0), cfg, total, step + 1)
            assert placed.get_last_lr() == scheduler.get_last_lr()


def test_cli_overrides_the_config_file() -> None:
    cfg, options = parse_args(["--layers", "1", "2", "--lr", "3e-4", "--resume"])
    assert cfg.layers == [1, 2] and cfg.lr == 3e-4 and options.resume
    assert cfg.name == "minilm-mask"  # the rest comes from the default config
    cfg, _ = parse_args(["--layers", "3", "--ks", "32"])
    assert cfg.layers == [3] and cfg.ks == [32]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--total_tokens", "abc"], "--total_tokens.*invalid int value: 'abc'"),
        (["--sae_batch_size", "0"], "--sae_batch_size must be at least 1"),
        (["--dtype", "nn"], "--dtype must be one of float32, bfloat16, float16; got 'nn'"),
        (["--total_tokens", "0"], "--total_tokens must be at least 1"),
        (["--total_tokens", "100"], "--total_tokens 100 is less than one SAE batch"),
        (["--name", "."], "--name '.': a run name is letters"),
        (["--name", "../../x"], "--name '../../x': a run name is letters"),
        (["--name", "checkpoints"], "--name 'checkpoints' is reserved.*--name checkpoints-run"),
        (["--name", "Logs"], "--name 'Logs' is reserved: .*OUTPUT_DIR/logs/"),
        (["--distribute", "shards"], "--distribute must be modules or replicate"),
        (["--sae_autocast", "fp16"], "--sae_autocast must be no or bfloat16; got 'fp16'"),
        (["--layers", "[1,3]"], "--layers: invalid int value"),
        (["--layers", "1", "1"], r"--layers repeats a value: \[1, 1\]"),
        (["--ks", "32", "32"], r"--ks repeats a value"),
        (["--feature_tokens", "-1"], "--feature_tokens must be 0 or more; got -1"),
        (["--grad_clip", "0"], "--grad_clip must be a positive finite number"),
        (["--lr", "inf"], "--lr must be a positive finite number"),
        (["--beta2", "1"], r"--beta2 must lie in \[0, 1\)"),
        (["--auxk_alpha", "-1"], "--auxk_alpha must be 0 or a positive finite number"),
        (["--k_aux", "0"], r"--k_aux must be at least 1 \(or unset\)"),
        (["--eval_tokens", "0"], "--eval_tokens must be at least 1; got 0"),
        (["--dead_tokens", "0"], "--dead_tokens 0 is less than one SAE batch .* raise it"),
        (["--t_min", "0", "--t_max", "0"], "policy 'mask' with t_max 0 masks no position"),
        (["--policy", "unmask", "--t_min", "1", "--t_max", "1"], "lower --t_min"),
    ],
)
def test_bad_command_line_values_name_the_option(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_unknown_config_key_names_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("layer: 3\n")
    with pytest.raises(ValueError, match="unknown config keys \\['layer'\\].*layers"):
        TrainConfig.from_yaml(path)
    path.write_text("layers: 3\nks: 16\nlr: 3e-4\n")  # YAML 1.1 scalars where lists/floats go
    cfg = TrainConfig.from_yaml(path)
    assert cfg.layers == [3] and cfg.ks == [16] and cfg.lr == 3e-4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"layers": [1, 9]}, r"block indices in 0\.\.5 .*got \[1, 9\]"),
        ({"ks": [768]}, "0 < k < d_sae=768"),
        ({"corpus": "no/such/corpus.txt"}, "corpus 'no/such/corpus.txt' does not exist"),
        ({"policy": "masked"}, "unknown mask policy 'masked'"),
        ({"buffer_tokens": 10**9}, r"needs .* GB .* free\. Try: .*--buffer_tokens"),
    ],
)
def test_config_errors_stop_before_any_output(tmp_path: Path, override: dict, message: str) -> None:
    out = tmp_path / "runs"
    with pytest.raises((ValueError, FileNotFoundError, MemoryError), match=message):
        train(TrainConfig(output_dir=str(out), **{**TINY_RUN, **override}))
    assert not out.exists() or not any(out.iterdir())


def test_heldout_split_short_of_one_batch_stops_before_training(tmp_path: Path) -> None:
    """Every 10th paragraph is held out: two short ones make a held-out split of a few tokens."""
    words = " ".join(f"word{i}" for i in range(300))
    docs = ["a short paragraph." if i % 10 == 9 else words for i in range(20)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(docs))
    out = tmp_path / "runs"
    cfg = TrainConfig(output_dir=str(out), corpus=str(corpus), **TINY_RUN)
    message = (
        "'heldout' split of .* fewer than one LLM batch \\(8 x 64 tokens\\); give --eval_corpus"
    )
    started = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert time.perf_counter() - started < 60 and not out.exists()  # before any step


@pytest.fixture(scope="module")
def checkpointed(minilm, tmp_path_factory) -> TrainConfig:
    """TINY_RUN stopped after a checkpoint at step 2 (the trainer's own setup, steps and save)."""
    cfg = TrainConfig(output_dir=str(tmp_path_factory.mktemp("runs")), **TINY_RUN)
    run = setup(cfg, minilm, start(cfg), resume=False)
    for _ in range(2):
        train_step(run)
    checkpoint(run)
    return cfg


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ks": [16]}, "with --ks 8; this launch has --ks 16. .*Resume with --ks 8; or "),
        ({"layers": [1]}, "with --layers 1 3; this launch has --layers 1. "),
        ({"d_sae": 1024}, "with no --d_sae; this launch has --d_sae 1024. "),
        (
            {"expansion_factor": 4},
            "with --expansion_factor 2; this launch has --expansion_factor 4",
        ),
        (
            {"total_tokens": 12288, "sae_batch_size": 512},
            "with --total_tokens 6144, --sae_batch_size 256; this launch has --total_tokens 12288, "
            "--sae_batch_size 512. .* --name tiny-mask-2 without --resume",
        ),
    ],
)
def test_resume_refuses_a_change_it_cannot_apply(
    checkpointed: TrainConfig, minilm, change: dict, message: str
) -> None:
    cfg = dataclasses.replace(checkpointed, **change)
    with pytest.raises(ValueError, match=f"--resume: .*step_00000002 was written {message}"):
        setup(cfg, minilm, start(cfg), resume=True)


def test_resume_applies_a_new_lr_betas_and_warmup(checkpointed: TrainConfig, minilm) -> None:
    """At step 2 of a 2-step warmup the factor is 1: the lr is the new one, not 2e-3 x 2/4."""
    cfg = dataclasses.replace(checkpointed, lr=5e-4, beta1=0.8, warmup_steps=2)
    run = setup(cfg, minilm, start(cfg), resume=True)
    group = run.optimizer.param_groups[0]
    assert run.state.step == 2 and run.optimizer.state  # the Adam moments are the checkpoint's
    assert group["lr"] == run.scheduler.get_last_lr()[0] == pytest.approx(5e-4)
    assert group["betas"] == (0.8, 0.999)
    train_step(run)
    assert run.state.step == 3


def copy_run(cfg: TrainConfig, to: Path) -> TrainConfig:
    shutil.copytree(cfg.output_dir, to)
    return dataclasses.replace(cfg, output_dir=str(to))


def test_stray_entries_are_not_checkpoints(checkpointed: TrainConfig, minilm, tmp_path) -> None:
    """A stray step_notes.txt was taken as the newest checkpoint (and the real one deleted)."""
    cfg = copy_run(checkpointed, tmp_path / "runs")
    root = checkpoint_root(cfg)
    (root / "step_notes.txt").write_text("notes")
    (root / "step_old").mkdir()
    run = setup(cfg, minilm, start(cfg), resume=True)
    assert run.state.step == 2
    train_step(run)
    checkpoint(run)  # replaces step 2, leaves what is not a checkpoint alone
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_notes.txt", "step_old"]


def test_truncated_checkpoint_file_is_named(checkpointed: TrainConfig, minilm, tmp_path) -> None:
    cfg = copy_run(checkpointed, tmp_path / "runs")
    file = checkpoint_root(cfg) / "step_00000002" / "rank_0.pt"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"checkpoint file {file} cannot be read .* truncated"):
        setup(cfg, minilm, start(cfg), resume=True)


def test_binary_config_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=f"--config {path} is not a YAML text file"):
        parse_args(["--config", str(path)])
    path.write_text("layers: [1, 3\n")
    with pytest.raises(ValueError, match=f"--config {path} is not a YAML text file"):
        parse_args(["--config", str(path)])


def test_diverging_run_stops_before_writing_a_suite(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    cfg = TrainConfig(output_dir=str(out), **{**TINY_RUN, "lr": 1e30, "warmup_steps": 1})
    with pytest.raises(FloatingPointError, match=r"step \d+: the loss of the SAE of layer \d, k 8"):
        train(cfg)
    assert not (out / TINY_RUN["name"]).exists()


def test_owners_are_contiguous_and_byte_balanced() -> None:
    keys = [(layer, k) for layer in range(6) for k in range(6)]
    owner = owners(keys, [1] * 36, 8)
    assert owner == sorted(owner) and {owner.count(r) for r in range(8)} == {4, 5}
    assert owners(keys[:2], [3, 1], 2) == [0, 1]
    assert owners(keys[:3], [1, 1, 6], 2) == [0, 0, 1]


def test_plan_counts_the_real_tensors(minilm) -> None:
    """The plan's bytes of the base model, SAE weights, gradients and Adam state (after a real
    step) and of the filled shuffle buffer are those of the tensors themselves."""
    cfg = TrainConfig(**{**TINY_RUN, "ks": [8, 16]})
    planned = plan(cfg, 1)["modes"]["replicate"]
    assert planned == plan(cfg, 1)["modes"]["modules"]  # one process: the same run
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    assert planned["base_model"] == size(minilm.model.parameters())
    keys = [(layer, k) for layer in cfg.layers for k in cfg.ks]
    saes = SAESet(cfg, minilm.d_model, "minilm", keys)
    optimizer = torch.optim.Adam(saes.parameters(), fused=True)
    x = torch.randn(64, len(cfg.layers), minilm.d_model)
    dead = torch.zeros(len(keys), cfg.latents(minilm.d_model), dtype=torch.bool)
    saes(x, cfg.layers, dead, cfg).loss.sum().backward()
    optimizer.step()
    assert planned["sae_weights"] == size(saes.parameters())
    assert planned["gradients"] == size(p.grad for p in saes.parameters())
    adam = [t for state in optimizer.state.values() for t in state.values()]
    assert planned["adam_state"] == size(adam)
    stream = ActivationStream(minilm, cfg, rank=0, world=1)
    next(iter(stream))
    buffer = size([stream.buffer])  # a fill stops within one LLM batch past the buffer size
    one_llm_batch = cfg.llm_batch_size * cfg.ctx_len * len(cfg.layers) * minilm.d_model * 4
    assert planned["shuffle_buffer"] / 2 <= buffer < planned["shuffle_buffer"] / 2 + one_llm_batch
    modules = plan_mode(cfg, model_shape("minilm"), 2, "modules")
    assert modules.saes_per_process == 2 and modules.sae_weights == planned["sae_weights"] // 2
    assert modules.comm_bytes_per_step == cfg.sae_batch_size * len(cfg.layers) * 384 * 4


HARVEST_PEAK = (
    """
import sys
from hub_sae.models import load_base_model
from hub_sae.training import TrainConfig
from hub_sae.training.stream import ActivationStream
small, cfg = (TrainConfig(**eval(arg)) for arg in sys.argv[1:])
base = load_base_model("minilm")
warm = ActivationStream(base, small, rank=0, world=1)  # reads the corpus, a forward of 16 tokens
warm.harvest_batch(warm._llm_batches())
"""
    + PEAK_RSS
    + """
stream = ActivationStream(base, cfg, rank=0, world=1)
stream.harvest_batch(stream._llm_batches())
print(kb("VmHWM") - before)
"""
)


def test_plan_bounds_the_measured_peak_of_a_harvest() -> None:
    """The forward of 32 x 256 tokens (2 hooked blocks, every position kept) against the peak RSS
    it adds (the plan had no such term: 0 bytes)."""
    run = {**TINY_RUN, "llm_batch_size": 32, "ctx_len": 256, "policy": "all"}
    small = {**run, "llm_batch_size": 1, "ctx_len": 16}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-c", HARVEST_PEAK, repr(small), repr(run)]
    measured = int(subprocess.check_output(cmd, env=env, text=True).split()[-1]) * 1024
    planned = base_forward(TrainConfig(**run), model_shape("minilm"))
    assert measured <= planned <= 2.5 * measured, (planned, measured)


def test_plan_command_prints_json_and_the_llada_recipe_fits_80gb_in_modules() -> None:
    def plan_json(*args: str) -> dict:
        cmd = [sys.executable, str(ROOT / "training" / "train.py"), "--plan", "--json", *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return json.loads(subprocess.run(cmd, env=env, capture_output=True, check=True).stdout)

    result = plan_json("--num_processes", "2")
    assert result["processes"] == 2 and set(result["modes"]) == {"replicate", "modules"}
    llada = ["--config", str(ROOT / "training" / "configs" / "llada-8b-mask.yaml")]
    result = plan_json(*llada, "--num_processes", "8")
    modes = result["modes"]
    assert modes["modules"]["per_process_bytes"] < 80e9 < modes["replicate"]["per_process_bytes"]
    assert modes["modules"]["comm_bytes_per_step"] * 10 < modes["replicate"]["comm_bytes_per_step"]
    assert modes["modules"]["tokens_per_sae_per_step"] == 8 * 2048


@pytest.mark.slow
def test_second_run_of_a_name_is_refused_and_a_killed_launcher_stops_training(
    tmp_path: Path,
) -> None:
    out = tmp_path / "runs"
    proc = launch(out, total_tokens=10**6, feature_tokens=0)
    lock = out / f".{TINY_RUN['name']}.lock"
    deadline = time.monotonic() + 240
    while not lock.exists():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.2)
    with pytest.raises(RuntimeError, match="'tiny-mask' is already running .* pick another --name"):
        train(TrainConfig(output_dir=str(out), **TINY_RUN))
    children = workers(proc)
    assert len(children) == 1
    proc.kill()  # the launcher only, as a closed terminal or a killed job would
    proc.wait()
    wait_gone(children, timeout=15)


@pytest.mark.slow
def test_mixed_precision_fp16_is_refused_with_the_fix(tmp_path: Path) -> None:
    log = finish(launch(tmp_path / "runs", precision="fp16"), ok=False)
    assert "--mixed_precision fp16: the SAEs train in float32" in log
    assert "launch with --mixed_precision no" in log


def test_bf16_autocast_run_writes_a_finite_float32_suite(tmp_path: Path) -> None:
    """--sae_autocast bfloat16 trains the SAEs with float32 weights and records the option."""
    run = {**TINY_RUN, "layers": [3], "total_tokens": 2048, "feature_tokens": 0}
    suite = train(TrainConfig(output_dir=str(tmp_path), sae_autocast="bfloat16", **run))
    sae = TopKSAE.from_pretrained(suite, layer=3)
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in sae.parameters())
    assert 0 < json.loads((suite / "layer_3" / "metrics.json").read_text())["fvu"] < 1
    assert json.loads((suite / "suite.json").read_text())["training"]["sae_autocast"] == "bfloat16"


def test_memory_check_with_more_processes_than_saes_names_the_problem() -> None:
    cfg = TrainConfig(layers=[1], ks=[32])
    with pytest.raises(ValueError, match="modules needs at least one SAE per process: 1 SAEs, 4"):
        check_fits(cfg, 4, 4, torch.device("cpu"))


@pytest.mark.parametrize("change", [{"ks": [16]}, {"expansion_factor": 4}, {"layers": [1]}])
def test_resume_of_a_checkpoint_without_its_config_names_the_mismatch(
    checkpointed: TrainConfig, minilm, tmp_path, change: dict
) -> None:
    """Checkpoints written before they recorded the config: the SAE tensors are compared instead
    (load_state_dict raised a bare size-mismatch traceback)."""
    cfg = copy_run(checkpointed, tmp_path / "runs")
    (step,) = checkpoints(checkpoint_root(cfg))
    trainer = torch.load(step / "trainer.pt", weights_only=True)
    del trainer["config"]
    torch.save(trainer, step / "trainer.pt")
    changed = dataclasses.replace(cfg, **change)
    with pytest.raises(ValueError, match="SAEs in .*step_00000002 do not match this launch's"):
        setup(changed, minilm, start(changed), resume=True)
    assert setup(cfg, minilm, start(cfg), resume=True).state.step == 2  # unchanged: resumes


def test_older_checkpoints_are_hidden_before_they_are_deleted(
    checkpointed: TrainConfig, minilm, tmp_path
) -> None:
    """A kill while deleting the previous step left step_* folders with only some files; it is
    now renamed to a hidden .old-step_* first, and such leftovers go at the next checkpoint."""
    cfg = copy_run(checkpointed, tmp_path / "runs")
    root = checkpoint_root(cfg)
    leftover = root / ".old-step_00000001"
    leftover.mkdir()
    (leftover / "trainer.pt").write_bytes(b"half")
    run = setup(cfg, minilm, start(cfg), resume=True)
    train_step(run)
    checkpoint(run)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    assert {p.name for p in (root / "step_00000003").iterdir()} == {"trainer.pt", "rank_0.pt"}
