"""Offline, quiet test environment: set before anything imports huggingface_hub or gradio."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY_RUN = dict(
    name="tiny-mask",
    layers=[1, 3],
    expansion_factor=2,
    ks=[8],
    ctx_len=64,
    total_tokens=6144,
    sae_batch_size=256,
    buffer_tokens=1024,
    warmup_steps=4,
    dead_tokens=2048,
    eval_tokens=1024,
    feature_tokens=1024,
)
"""A suite small enough to train in seconds on the embedded default (MiniLM, pydoc, mask policy)."""


@pytest.fixture(scope="session")
def trained_suite(tmp_path_factory) -> Path:
    """A complete suite (no card yet) trained by the real trainer, in-process, once per session."""
    from hub_sae.training import TrainConfig, train

    out = tmp_path_factory.mktemp("runs")
    return train(TrainConfig(output_dir=str(out), **TINY_RUN))
