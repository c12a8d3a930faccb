"""Push a whole suite to the Hub in one commit, after checking it is complete; or list it (dry run).

Every file under the suite folder goes up (hidden files and folders such as `.cache/` and
temp files excepted): suite.json, README.md, the plots, each layer's folder and metrics.json.
Symbolic links are refused (they could point outside the suite), every SAE must load (no corrupt,
empty or non-finite weights), a file that is not part of the suite layout (an `hf_token.txt`, say)
is refused unless an `include` pattern names it, and files the repo has but the suite no longer
has are deleted in the same commit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import NamedTuple

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    metadata_load,
)
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from hub_sae.cards import BY_T_PLOT_FILE, CARD_FILE, PLOT_FILE, SUMMARY_FILE
from hub_sae.features import FEATURES_FILE
from hub_sae.formats import SAELoadError, load_sae
from hub_sae.suite import LAYER_FILES, SUITE_FILE, layer_folders, validate_suite

UNITS = ("B", "kB", "MB", "GB", "TB")
SUITE_ROOT_FILES = {SUITE_FILE, CARD_FILE, PLOT_FILE, BY_T_PLOT_FILE, SUMMARY_FILE}
SUITE_LAYER_FILES = {*LAYER_FILES, CARD_FILE, FEATURES_FILE}


class PublishError(ValueError):
    """A suite is not ready to publish; the message lists what is missing and how to fix it."""


class SuiteFile(NamedTuple):
    """One file of a suite as it will lie in the repo."""

    path_in_repo: str
    """Its path in the repo (POSIX, relative to the suite folder)."""
    local_path: Path
    """The file on disk."""
    size: int
    """Bytes."""


def _is_hidden(rel: Path) -> bool:
    """Whether a relative path is hidden or lies in a hidden folder (a name starting with '.')."""
    return any(part.startswith(".") for part in rel.parts)


def suite_files(root: str | Path) -> list[SuiteFile]:
    """Every regular file that a push of `root` uploads, sorted by path in the repo."""
    root = Path(root)
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and not path.is_symlink() and not _is_hidden(rel):
            files.append(SuiteFile(rel.as_posix(), path, path.stat().st_size))
    return sorted(files)


def symlinks(root: str | Path) -> list[Path]:
    """Symbolic links inside `root` (not followed), which a push refuses to upload."""
    root = Path(root)
    return sorted(
        p for p in root.rglob("*") if p.is_symlink() and not _is_hidden(p.relative_to(root))
    )


def stray_files(root: str | Path, files: list[SuiteFile]) -> list[SuiteFile]:
    """The files among `files` that are not part of the suite's layout."""
    folders = {f.relative_to(root).as_posix() for f in layer_folders(root).values()}

    def expected(path_in_repo: str) -> bool:
        folder, _, name = path_in_repo.rpartition("/")
        return name in (SUITE_LAYER_FILES if folder else SUITE_ROOT_FILES) and (
            not folder or folder in folders
        )

    return [f for f in files if not expected(f.path_in_repo)]


def included(file: SuiteFile, include: Sequence[str]) -> bool:
    """Whether a pattern of `include` (fnmatch, on the path in the repo) names `file`."""
    return any(fnmatchcase(file.path_in_repo, pattern) for pattern in include)


def _fix(problem: str, root: Path, repo_id: str) -> str:
    """`problem` from validate_suite with what to do about it."""
    card_command = f"`hub-sae card {root}`"
    if card_command in problem:
        return problem.replace(card_command, f"`hub-sae card {root} --repo-id {repo_id}`")
    if problem.endswith("metrics.json is missing"):
        return f"{problem}: run `hub-sae eval {root}`"
    if problem.endswith(("model.safetensors is missing", "config.json is missing")):
        return f"{problem}: restore it from the training output or train the suite again"
    return problem


def card_repo_id(card: Path) -> str | None:
    """The repo id a card was generated for (its model-index name), if it says."""
    index = (metadata_load(card) or {}).get("model-index") or [{}]
    return index[0].get("name")


def publish_problems(root: str | Path, repo_id: str, include: Sequence[str] = ()) -> list[str]:
    """What keeps `root` from being pushed to `repo_id`, each with its fix (empty when ready);
    `include`: patterns naming files beyond the suite layout that may go up."""
    root = Path(root)
    problems = [
        f"{link} is a symbolic link (to {link.readlink()}): push uploads only regular files "
        "inside the suite; replace it with a copy of what it points to"
        for link in symlinks(root)
    ]
    problems += [_fix(p, root, repo_id) for p in validate_suite(root, require_card=True)]
    if not problems:
        problems += [
            f"{f.local_path} ({human_size(f.size)}) is not part of the suite layout: move it out "
            f"of the folder, or upload it with --include {f.path_in_repo}"
            for f in stray_files(root, suite_files(root))
            if not included(f, include)
        ]
        for folder in layer_folders(root).values():
            try:
                load_sae(folder)
            except SAELoadError as e:
                problems.append(f"{e} (layer folder {folder})")
    card = root / CARD_FILE
    if card.is_file():
        again = f"run `hub-sae card {root} --repo-id {repo_id}`"
        if not (root / PLOT_FILE).is_file():
            problems.append(f"{root / PLOT_FILE} (the plot the card shows) is missing: {again}")
        made_for = card_repo_id(card)
        if made_for is not None and made_for != repo_id:
            problems.append(f"{card} was generated for {made_for!r}, not {repo_id!r}: {again}")
    return problems


def check_publishable(
    root: str | Path, repo_id: str, include: Sequence[str] = ()
) -> list[SuiteFile]:
    """The files to push (those beyond the suite layout only if `include` names them), or a
    PublishError listing every problem."""
    problems = publish_problems(root, repo_id, include)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise PublishError(
            f"refusing to push {root} to {repo_id}: the suite is not ready.\n{listed}"
        )
    return suite_files(root)


def human_size(n: int) -> str:
    """Bytes as B / kB / MB / GB / TB (powers of 1000, as the Hub shows them)."""
    exponent = 0 if n < 1000 else min(int(math.log10(n)) // 3, 4)
    return f"{n} B" if exponent == 0 else f"{n / 1000**exponent:.1f} {UNITS[exponent]}"


def format_file_list(files: list[SuiteFile]) -> str:
    """One line per file (path in repo, bytes, readable size) and the total."""
    width = max((len(f.path_in_repo) for f in files), default=0)
    lines = [f"{f.path_in_repo:<{width}}  {f.size:>12,}  {human_size(f.size):>9}" for f in files]
    total = sum(f.size for f in files)
    lines.append(
        f"{'total (' + str(len(files)) + ' files)':<{width}}  {total:>12,}  {human_size(total):>9}"
    )
    return "\n".join(lines)


def commit_operations(
    files: list[SuiteFile], repo_files: list[str]
) -> list[CommitOperationAdd | CommitOperationDelete]:
    """Upload every file of the suite; delete what the repo has beyond it (hidden files kept)."""
    local = {f.path_in_repo for f in files}
    stale = sorted(p for p in repo_files if p not in local and not _is_hidden(Path(p)))
    return [
        *(CommitOperationAdd(f.path_in_repo, str(f.local_path)) for f in files),
        *(CommitOperationDelete(path) for path in stale),
    ]


def push_suite(
    root: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    files: list[SuiteFile] | None = None,
    include: Sequence[str] = (),
) -> CommitInfo:
    """Create `repo_id` if needed and make the repo (at `revision`) hold exactly the suite, in one
    commit, or in a pull request with `create_pr`. `files`: what `check_publishable` already
    returned for this suite (it loads every SAE, so it need not run twice); `include`: patterns
    naming files beyond the suite layout that may go up."""
    files = check_publishable(root, repo_id, include) if files is None else files
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    try:
        repo_files = api.list_repo_files(repo_id, revision=revision, repo_type="model")
    except (RepositoryNotFoundError, RevisionNotFoundError):
        repo_files = []
    operations = commit_operations(files, repo_files)
    return api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or f"Upload hub-sae suite ({len(files)} files)",
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
    )
