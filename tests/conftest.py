"""Offline, quiet test environment: set before anything imports huggingface_hub or gradio."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

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


PEAK_RSS = """
import re
kb = lambda field: int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read())[1])
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS (VmHWM) restarts from here
before = kb("VmRSS")
"""
"""Script lines that start a peak-RSS measurement: `kb("VmHWM") - before` is what it added (kB)."""


def cli_args(out: Path, **overrides) -> list[str]:
    """TINY_RUN (+ overrides) as `--field value ...` arguments of training/train.py."""
    args = []
    for key, value in {**TINY_RUN, "output_dir": str(out), **overrides}.items():
        args += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return args


def launch(
    out: Path, *extra: str, processes: int = 1, precision: str = "no", **overrides
) -> subprocess.Popen:
    """`accelerate launch training/train.py` (gloo on CPU for 2+ processes) in its own process group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes > 1:  # `--cpu --num_processes 2` would silently run one process
        env["ACCELERATE_USE_CPU"] = "true"
        flags = ["--multi_gpu", "--num_processes", str(processes)]
    else:
        flags = ["--cpu", "--num_processes", "1"]
    cmd = [
        *(sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_machines", "1"),
        *("--mixed_precision", precision, "--dynamo_backend", "no"),
        *(str(ROOT / "training" / "train.py"), *cli_args(out, **overrides), *extra),
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


def finish(proc: subprocess.Popen, timeout: float = 300, ok: bool = True) -> str:
    """The launch's output, once it has exited (with status 0 unless `ok` is False)."""
    out, _ = proc.communicate(timeout=timeout)
    assert (proc.returncode == 0) == ok, out[-4000:]
    return out


def workers(proc: subprocess.Popen) -> list[Path]:
    """/proc folders of the launcher's child processes."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return [Path(f"/proc/{pid}") for pid in children]


def wait_gone(processes: list[Path], timeout: float = 20) -> None:
    """Wait until each process has exited (a zombie counts: it holds no files, no lock)."""
    deadline = time.monotonic() + timeout
    for process in processes:
        while process.exists() and (process / "stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline, f"{process} outlived its launcher"
            time.sleep(0.2)
