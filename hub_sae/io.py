"""File and hub I/O shared by every module: atomic writes, paths kept inside their folder, and the
one rule that tells a local path from a hub repo id.

- `write_atomic` / `write_json`: a temp file beside the target, fsync, rename; readers never see
  half a file, and a crash leaves the old file in place. `write_folder` does the same for a folder.
- `folder_target(path)`: the folder `write_folder` replaces (through a symlink; never the current
  folder or one above it).
- `new_folder(path)`: the lock of a folder that must be new or empty, checked under it.
- `folder_lock(folder)`: the one lock of a folder (`.NAME.lock` beside it), held by whoever writes
  it (`write_folder`, the trainer for a whole run, `hub-sae eval` and `card`); a second process
  stops at once with `FolderBusyError` naming the holder.
- `inside(root, name)`: `root / name` for a name read from a file or typed by a user, refusing
  absolute names, `..` and symlinks that lead out of `root`.
- `local_path(source)`: an existing path is local, `owner/name` is a hub repo id, anything else is
  an error that says which it looked like and how to fix it.
- `HubOptions`: the download arguments (revision, cache, token, offline) in one record.
- `is_int(value)`: whether a value parsed from JSON is an integer (true and false are not).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

FILE_SUFFIXES = frozenset(
    ".txt .jsonl .json .csv .parquet .yaml .yml .safetensors .pt .pth .bin .gz .zip".split()
)
"""Endings that make a name read as a file path rather than a hub repo id."""


class UnsafePathError(ValueError):
    """A name read from a file or the command line points outside the folder it belongs to."""


def is_int(value: object) -> bool:
    """Whether `value` is an int and not a bool (JSON's true / false parse as bool, an int type)."""
    return isinstance(value, int) and not isinstance(value, bool)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_TORCH_FULL = ("unexpected pos", "file write failed")  # torch.save's words for a short write


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a write that fails for lack of space (torch says "unexpected pos") into an OSError
    that names `path` and the fix."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        full = e.errno in _FULL if isinstance(e, OSError) else any(m in str(e) for m in _TORCH_FULL)
        if not full:
            raise
        raise OSError(
            errno.ENOSPC,
            f"no space left to write {path}: free disk space there, or write elsewhere "
            "(e.g. --output_dir on a larger disk)",
        ) from e


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` through a unique temp file + rename: no reader sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with writing(path), open(tmp, "xb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: dict) -> Path:
    """`data` as indented, key-sorted JSON, written atomically."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class FolderBusyError(RuntimeError):
    """Another process holds the lock of a folder this process means to write."""


_held: set[Path] = set()
"""Lock files this process holds (a nested `folder_lock` of one of them passes)."""


def lock_file(folder: str | Path) -> Path:
    """The lock of `folder`: `.NAME.lock` beside it (the path as given, made absolute)."""
    folder = Path(os.path.abspath(folder))
    return folder.with_name(f".{folder.name}.lock")


@contextmanager
def folder_lock(
    folder: str | Path, fix: str = "wait for it to finish, or write elsewhere."
) -> Iterator[None]:
    """Hold `folder`'s lock (an flock on `lock_file(folder)`) for the block; nested holds in this
    process pass, another process raises FolderBusyError at once with its pid, command and `fix`."""
    path = lock_file(folder)
    if path in _held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, folder, fix)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} ({' '.join(sys.argv)})\n".encode(), 0)
        _held.add(path)
        yield
    finally:
        _held.discard(path)
        path.unlink(missing_ok=True)  # while still held: no lock files are left behind
        os.close(fd)  # releases the flock


def _acquire(path: Path, folder: str | Path, fix: str) -> int:
    """An open descriptor of the lock file `path`, flocked; FolderBusyError when another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderBusyError(
                f"{folder} is in use: {holder} holds its lock {path}. {fix[0].upper()}{fix[1:]}"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the file as we opened it: lock the current one


def folder_target(path: str | Path) -> Path:
    """The folder `write_folder(path)` replaces: absolute, the target of a symlink. The current
    folder and those above it are refused (replacing them would pull the ground from under us)."""
    target = Path(os.path.abspath(path))
    if target.is_symlink():
        target = target.resolve()
    if Path.cwd().resolve().is_relative_to(target.resolve()):
        raise ValueError(
            f"refusing to write {path}: it is the current folder or one above it, and writing a "
            "folder replaces it whole. Name a new folder instead, e.g. ./out."
        )
    return target


@contextmanager
def new_folder(path: str | Path) -> Iterator[Path]:
    """Hold the lock of `path`, a folder about to be written that must be new or empty (checked
    under the lock, so no other writer fills it meanwhile); yields `folder_target(path)`."""
    target = folder_target(path)
    with folder_lock(target):
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise FileExistsError(
                f"{path} already exists and is not empty; remove it or pick another."
            )
        yield target


def write_folder(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with `fill(tmp)` in a fresh temp folder beside `path`, then rename it to
    `path`, replacing any previous folder only once the new one is complete.

    The folder's lock is held throughout, so a second writer stops at once; a symlink `path` keeps
    pointing at the (new) folder it names.
    """
    target = folder_target(path)
    with folder_lock(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        old = tmp.with_suffix(".old")
        tmp.mkdir()  # unique, and with the umask's permissions (mkdtemp's are owner-only)
        try:
            with writing(target):
                fill(tmp)
            if target.exists():
                os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                if old.exists():
                    os.replace(old, target)  # put the previous folder back
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return Path(path)


def inside(root: str | Path, name: str | Path) -> Path:
    """`root / name` for an untrusted relative `name`: no absolute path, no `..`, no symlink out.

    The path need not exist; if it (or a folder on the way) is a symlink, its target must lie
    inside `root` too.
    """
    relative = PurePosixPath(Path(name).as_posix())
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise UnsafePathError(
            f"{str(name)!r} is not a relative path inside {root}: absolute paths and '..' are "
            "refused. Fix the file or option that names it."
        )
    path = Path(root, *relative.parts)
    target = path.resolve()
    if not target.is_relative_to(Path(root).resolve()):
        raise UnsafePathError(
            f"{path} leads out of {root} (to {target}) through a symlink; replace the link with "
            "the real file or folder."
        )
    return path


def is_repo_id(text: str) -> bool:
    """Whether `text` is a valid hub repo id of the form `owner/name`."""
    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def local_path(source: str | Path) -> Path | None:
    """The local file or folder `source` names, or None when it is a hub repo id `owner/name`.

    Missing paths are never taken for repo ids: a name that looks like a path (./ ../ / ~, a file
    suffix, several '/', or a first part that is a local folder) raises FileNotFoundError, and so
    does a bare name (no '/'), since it could be either.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return path
    first = text.split("/")[0]
    shadowed = "/" in text and Path(first).expanduser().is_dir()
    if (
        text.startswith(("./", "../", "/", "~"))
        or path.suffix.lower() in FILE_SUFFIXES
        or text.count("/") > 1
        or shadowed
    ):
        hint = (
            f" ({first}/ is a local folder, so this reads as a path; to load the hub repo {text}, "
            "run from another folder)"
            if shadowed and is_repo_id(text)
            else ""
        )
        raise FileNotFoundError(
            f"{text} does not exist; give the path of an existing file or folder{hint}."
        )
    if is_repo_id(text):
        return None
    raise FileNotFoundError(
        f"{text!r} is neither an existing local path (no such file or folder in {Path.cwd()}) "
        "nor a hub repo id (those read owner/name). Give an existing path, e.g. ./runs/NAME, or "
        "the full repo id."
    )


@dataclass(frozen=True)
class HubOptions:
    """The arguments of every hub download."""

    revision: str | None = None
    """Branch, tag or commit (default: main)."""
    cache_dir: str | Path | None = None
    """The hub cache (default: huggingface_hub's)."""
    token: str | bool | None = None
    """Access token (default: the logged-in one)."""
    local_files_only: bool = False
    """Read the cache only, never the network."""

    def snapshot(self, repo_id: str, allow_patterns: list[str] | None = None) -> Path:
        """The files of `repo_id` matching `allow_patterns`, downloaded to (or read from) the hub
        cache, as a folder. Never a `local_dir`: huggingface_hub would return an existing folder of
        that name, unchecked, whenever the hub cannot be reached."""
        try:
            folder = snapshot_download(repo_id, allow_patterns=allow_patterns, **asdict(self))
        except (RepositoryNotFoundError, LocalEntryNotFoundError) as e:
            raise FileNotFoundError(
                f"{repo_id} is not a local path, and the hub repo {repo_id} could not be read "
                f"({type(e).__name__}). Check the path or repo id, your token, or go online."
            ) from e
        return Path(folder)

    def file(self, repo_id: str, filename: str) -> Path:
        """One file of `repo_id`, downloaded (or cached)."""
        return Path(hf_hub_download(repo_id, filename, **asdict(self)))
