"""Push a whole suite to the Hub in one commit, after checking it is complete; or list it (dry run).

Every file under the suite folder goes up (hidden files and folders such as `.cache/` and
temp files excepted): suite.json, README.md, the plot, each layer's folder and metrics.json.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, metadata_load

from hub_sae.cards import CARD_FILE, PLOT_FILE
from hub_sae.suite import validate_suite

UNITS = ("B", "kB", "MB", "GB", "TB")


class PublishError(ValueError):
    """A suite is not ready to publish; the message lists what is missing and how to fix it."""


class SuiteFile(NamedTuple):
    """One file of a suite as it will lie in the repo."""

    path_in_repo: str
    local_path: Path
    size: int


def suite_files(root: str | Path) -> list[SuiteFile]:
    """Every file that a push of `root` uploads, sorted by path in the repo."""
    root = Path(root)
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append(SuiteFile(rel.as_posix(), path, path.stat().st_size))
    return sorted(files)


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


def publish_problems(root: str | Path, repo_id: str) -> list[str]:
    """What keeps `root` from being pushed to `repo_id`, each with its fix (empty when ready)."""
    root = Path(root)
    problems = [_fix(p, root, repo_id) for p in validate_suite(root, require_card=True)]
    card = root / CARD_FILE
    if card.is_file():
        again = f"run `hub-sae card {root} --repo-id {repo_id}`"
        if not (root / PLOT_FILE).is_file():
            problems.append(f"{root / PLOT_FILE} (the plot the card shows) is missing: {again}")
        made_for = card_repo_id(card)
        if made_for is not None and made_for != repo_id:
            problems.append(f"{card} was generated for {made_for!r}, not {repo_id!r}: {again}")
    return problems


def check_publishable(root: str | Path, repo_id: str) -> list[SuiteFile]:
    """The files to push, or a PublishError listing every problem."""
    problems = publish_problems(root, repo_id)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise PublishError(
            f"refusing to push {root} to {repo_id}: the suite is incomplete.\n{listed}"
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


def push_suite(
    root: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Create `repo_id` if needed and upload the whole suite in a single commit."""
    files = check_publishable(root, repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [CommitOperationAdd(f.path_in_repo, str(f.local_path)) for f in files]
    return api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or f"Upload hub-sae suite ({len(files)} files)",
        repo_type="model",
    )
