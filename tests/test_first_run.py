"""The README's first command, `python training/train.py`, as a new user sees it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_plain_run_shows_progress_for_each_phase_and_no_warning(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "output_dir": str(tmp_path / "runs")}))
    run = subprocess.run(
        [sys.executable, "training/train.py", "--config", str(config)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    output = run.stdout + run.stderr
    assert "warn" not in output.lower(), output
    for bar in (TINY_RUN["name"], "evaluation", "spliced runs", "features"):
        assert f"{bar}: 100%" in output, f"no finished progress bar {bar!r} in:\n{output}"
    assert (tmp_path / "runs" / TINY_RUN["name"] / "suite.json").is_file()
