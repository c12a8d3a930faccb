"""hub_sae.io: atomic writes, the containment rule and the local-path-or-repo-id rule."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub_sae.io import (
    FolderBusyError,
    UnsafePathError,
    folder_lock,
    inside,
    is_int,
    is_repo_id,
    local_path,
    write_atomic,
    write_folder,
    write_json,
    writing,
)


def test_write_atomic_replaces_the_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json(path, {"b": 1, "a": 2})
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(TypeError):
        write_atomic(path, 12345)  # type: ignore[arg-type]  # fails while writing the temp file
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["metrics.json"]


def test_write_folder_replaces_the_whole_folder_only_once_complete(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    write_folder(out, lambda tmp: (tmp / "a.json").write_text("1"))
    write_folder(out, lambda tmp: (tmp / "b.json").write_text("2"))
    assert os.listdir(out) == ["b.json"]
    (tmp_path / "plain").mkdir()  # the folder has the umask's permissions, as mkdir gives
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "plain").rmdir()

    def half_written(tmp: Path) -> None:
        (tmp / "c.json").write_text("3")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash"):
        write_folder(out, half_written)
    assert os.listdir(out) == ["b.json"] and os.listdir(tmp_path) == ["suite"]


SLOW_WRITER = """
import sys, time
from pathlib import Path
from hub_sae.io import write_folder

def fill(tmp):
    (tmp / "first").write_text(sys.argv[2])
    Path(sys.argv[1] + ".started").touch()
    while not Path(sys.argv[3]).exists():  # half-written until the gate file appears
        time.sleep(0.05)
    (tmp / "second").write_text(sys.argv[2])

write_folder(sys.argv[1], fill)
"""

HOLD = """
import sys
from hub_sae.io import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def python(script: str, *args: str, **popen) -> subprocess.Popen:
    """A real process running `script` with this worktree's hub_sae."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True, **popen)


def hold_lock(folder: Path) -> subprocess.Popen:
    """A real process holding `folder`'s lock until its stdin closes."""
    holder = python(HOLD, str(folder), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_process_writing_the_same_folder_stops_at_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    gate = tmp_path / "go"
    first = python(SLOW_WRITER, str(out), "first", str(gate), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not Path(f"{out}.started").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.05)
    second = python(SLOW_WRITER, str(out), "second", str(tmp_path), stderr=subprocess.PIPE)
    assert second.wait(timeout=60) == 1
    err = second.stderr.read()
    assert f"FolderBusyError: {out} is in use: process {first.pid} " in err
    assert f"holds its lock {tmp_path / '.out.lock'}" in err and "write elsewhere" in err
    gate.touch()
    assert first.wait(timeout=60) == 0, first.stderr.read()
    assert {p.name: p.read_text() for p in out.iterdir()} == {"first": "first", "second": "first"}
    assert sorted(os.listdir(tmp_path)) == ["go", "out", "out.started"]  # no temp, no lock


def test_a_lock_is_held_once_per_process_and_names_its_holder(tmp_path: Path) -> None:
    holder = hold_lock(tmp_path / "suite")
    with pytest.raises(FolderBusyError, match=f"process {holder.pid} .* Wait for it"):
        write_folder(tmp_path / "suite", lambda tmp: None)
    holder.communicate("")  # its stdin closes: it lets go
    with folder_lock(tmp_path / "suite"), folder_lock(tmp_path / "suite"):  # nested: passes
        write_folder(tmp_path / "suite", lambda tmp: (tmp / "a").write_text("1"))
    assert os.listdir(tmp_path) == ["suite"]


def test_write_folder_never_replaces_the_current_folder_and_writes_through_a_link(
    tmp_path: Path, monkeypatch
) -> None:
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for path in (".", "..", str(here), "/"):
        with pytest.raises(ValueError, match="current folder or one above it.* a new folder"):
            write_folder(path, lambda tmp: (tmp / "a").write_text("1"))
    assert here.is_dir() and os.listdir(here) == []
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    write_folder(tmp_path / "link", lambda tmp: (tmp / "a").write_text("1"))
    assert (tmp_path / "link").readlink() == tmp_path / "real"
    assert os.listdir(tmp_path / "real") == ["a"]
    assert sorted(os.listdir(tmp_path)) == ["here", "link", "real"]  # no dangling .link.old


def test_is_int_refuses_bools_and_floats() -> None:
    assert is_int(3) and is_int(0)
    assert not any(is_int(v) for v in (True, False, 3.0, "3", None))


def test_write_atomic_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("secret")
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "metrics.json").symlink_to(outside)
    write_json(tmp_path / "suite" / "metrics.json", {})
    assert outside.read_text() == "secret"


def test_inside_refuses_absolute_names_dotdot_and_symlinks_out(tmp_path: Path) -> None:
    root = tmp_path / "suite"
    (root / "layer_1").mkdir(parents=True)
    (tmp_path / "victim").mkdir()
    assert inside(root, "layer_1/metrics.json") == root / "layer_1" / "metrics.json"
    assert inside(root, "layer_9") == root / "layer_9"  # need not exist
    for name in ("/etc/passwd", "layer_1/../../victim", "..", ""):
        with pytest.raises(UnsafePathError, match="not a relative path inside"):
            inside(root, name)
    (root / "layer_2").symlink_to(tmp_path / "victim")
    with pytest.raises(UnsafePathError, match="leads out of .* through a symlink"):
        inside(root, "layer_2/metrics.json")
    (root / "layer_3").symlink_to(root / "layer_1")  # a link that stays inside is fine
    assert inside(root, "layer_3") == root / "layer_3"


def test_local_path_never_takes_a_missing_path_for_a_repo_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    assert local_path("runs/tiny") == Path("runs/tiny")
    assert local_path(tmp_path / "runs") == tmp_path / "runs"
    assert local_path("me/my-suite") is None and is_repo_id("me/my-suite")
    for missing in ("runs/typo", "./typo", "../typo", "/no/such", "~/no-such", "a/b/c", "x.txt"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            local_path(missing)
    with pytest.raises(FileNotFoundError, match="neither an existing local path .* owner/name"):
        local_path("c_nolayer")
    assert not is_repo_id("a/b/c") and not is_repo_id("me/bad..name") and not is_repo_id("x")


FULL_DISK = """
import resource, signal, sys, torch
from hub_sae.io import writing
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
with writing(sys.argv[1]):
    torch.save({"w": torch.zeros(100_000)}, sys.argv[1])
"""


def test_a_full_disk_names_the_path_and_the_fix(tmp_path: Path) -> None:
    """torch.save on a full disk says only "unexpected pos"; `writing` names the file and the fix."""
    target = tmp_path / "trainer.pt"
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(target)], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert f"OSError: [Errno {errno.ENOSPC}] no space left to write {target}" in done.stderr
    assert "unexpected pos" in done.stderr  # the cause stays in the traceback
    with pytest.raises(RuntimeError, match="something else"), writing(target):
        raise RuntimeError("something else")
